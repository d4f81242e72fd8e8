"""Fine-tuning strategies: what to train of a pretrained model, and LoRA from scratch.

A pretrained tower plus a new task head can be adapted in several ways (000 §3-4, 003 §4):

- **linear probe**: freeze the tower, train only the head (:func:`linear_probe`);
- **top-k layers**: train the last k blocks and the head (:func:`top_k_layers`);
- **full fine-tuning**: train everything (:func:`full_finetune`);
- **LoRA** (Hu et al. 2021): keep every weight W frozen and learn a low-rank update,
  ``h = W x + (alpha / r) * B A x`` with A (r, d_in) and B (d_out, r), r << d
  (:class:`LoRALinear`, :func:`apply_lora`; the same through ``peft`` with
  :func:`apply_peft_lora`).

:func:`param_groups` splits the trainable parameters for AdamW: weight decay on matrices,
none on biases and LayerNorm weights (1-D tensors). :func:`parameter_summary` counts
trainable and total parameters.

Axis letters: B batch, N tokens, D_in / D_out the widths of a linear layer, r the LoRA rank.

Taught in notebooks/08_fine_tuning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmcourse import utils
from mmcourse.encoders import count_parameters

logger = logging.getLogger(__name__)

STRATEGIES = ("linear_probe", "top_k", "full")


# --- parameter groups and counts ----------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a decayed and a non-decayed group for AdamW.

    Matrices (2-D and more: linear weights, embeddings, convolutions) get ``weight_decay``;
    1-D tensors (biases, LayerNorm/BatchNorm weights and biases) get none: shrinking a
    LayerNorm gain or a bias towards 0 is not a sensible prior. Frozen parameters
    (``requires_grad=False``) are left out.

    Args:
        model: the model.
        weight_decay: lambda for the decayed group, >= 0.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay},
        {"params": [...], "weight_decay": 0.0}]`` (empty groups are dropped).

    Taught in notebooks/08_fine_tuning.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def parameter_summary(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters of ``model``.

    Returns:
        ``{"trainable": int, "total": int, "fraction": trainable / total}``.

    Taught in notebooks/08_fine_tuning.
    """
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


# --- freezing and the strategies ----------------------------------------------------------


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module``; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=True`` on every parameter of ``module``; returns it."""
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def linear_probe(model: nn.Module, *, head: nn.Module) -> nn.Module:
    """Freeze everything but ``head`` (a submodule of ``model``).

    Taught in notebooks/08_fine_tuning.
    """
    _check_submodule(model, head, "head")
    freeze(model)
    unfreeze(head)
    return model


def top_k_layers(
    model: nn.Module, *, blocks: Sequence[nn.Module], head: nn.Module, k: int
) -> nn.Module:
    """Freeze everything but the last ``k`` of ``blocks`` and ``head``.

    Args:
        model: the whole model.
        blocks: the tower's blocks in order (e.g. ``bert.encoder.layer``).
        head: the task head.
        k: how many of the last blocks train, 1 <= k <= len(blocks).

    Taught in notebooks/08_fine_tuning.
    """
    utils.positive_int(k=k)
    if k > len(blocks):
        raise ValueError(f"k must be at most the number of blocks ({len(blocks)}), got {k}")
    _check_submodule(model, head, "head")
    freeze(model)
    for block in list(blocks)[len(blocks) - k :]:
        _check_submodule(model, block, "blocks")
        unfreeze(block)
    unfreeze(head)
    return model


def full_finetune(model: nn.Module) -> nn.Module:
    """Train every parameter (the same as :func:`unfreeze`).

    Taught in notebooks/08_fine_tuning.
    """
    return unfreeze(model)


def apply_strategy(
    model: nn.Module,
    strategy: str,
    *,
    blocks: Sequence[nn.Module],
    head: nn.Module,
    k: int = 2,
) -> nn.Module:
    """``"linear_probe"``, ``"top_k"`` (with ``k``) or ``"full"``, by name.

    Taught in notebooks/08_fine_tuning.
    """
    utils.one_of("strategy", strategy, STRATEGIES)
    if strategy == "linear_probe":
        return linear_probe(model, head=head)
    if strategy == "top_k":
        return top_k_layers(model, blocks=blocks, head=head, k=k)
    return full_finetune(model)


def _check_submodule(model: nn.Module, part: nn.Module, name: str) -> None:
    if not any(m is part for m in model.modules()):
        raise ValueError(
            f"{name} must be a submodule of model, got a separate {type(part).__name__}"
        )


# --- LoRA from scratch --------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (LoRA, Hu et al. 2021).

    ``h = W x + b + (alpha / r) * B A dropout(x)``, A: (r, D_in), B: (D_out, r). A starts
    Kaiming-uniform (as in ``peft``), B at zero, so at the start the layer equals ``base``.
    The names ``base_layer``, ``lora_A``, ``lora_B`` and ``scaling`` follow ``peft``.

    Args:
        base: the pretrained linear layer (frozen here).
        r: the rank, >= 1.
        alpha: the scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the input of the LoRA branch only.

    Taught in notebooks/08_fine_tuning.
    """

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        utils.positive_int(r=r)
        utils.positive_float(alpha=alpha)
        utils.fraction(dropout=dropout)
        self.base_layer = freeze(base)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        d_in, d_out = base.in_features, base.out_features
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(d_in, r, bias=False)  # A: (r, D_in)
        self.lora_B = nn.Linear(r, d_out, bias=False)  # B: (D_out, r)
        self.lora_A.to(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B.to(device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D_in) -> (..., D_out)."""
        if x.shape[-1] != self.base_layer.in_features:
            raise ValueError(
                f"expected input of shape (..., {self.base_layer.in_features}), "
                f"got {tuple(x.shape)}"
            )
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # (..., r) -> (..., D_out)
        return self.base_layer(x) + self.scaling * update

    def delta_weight(self) -> Tensor:
        """The update ``(alpha / r) * B A`` as a (D_out, D_in) matrix."""
        return self.scaling * self.lora_B.weight @ self.lora_A.weight  # (D_out, D_in)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha / r) B A``: the same function, no extra cost."""
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None).to(
            device=base.weight.device, dtype=base.weight.dtype
        )
        merged.weight.copy_(base.weight + self.delta_weight())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def apply_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Freeze ``model`` and replace each ``nn.Linear`` whose name ends in a target by a
    :class:`LoRALinear` (in place).

    Args:
        model: any module (e.g. a :class:`mmcourse.encoders.TextEncoder`, a ``BertModel``).
        target_modules: last components of the names to adapt, e.g. ``("q_proj", "v_proj")``
            for our blocks or ``("query", "value")`` for ``BertModel``.
        r, alpha, dropout: as in :class:`LoRALinear`.

    Returns:
        The names of the replaced layers. Only their A and B train afterwards; unfreeze a
        task head yourself.

    Taught in notebooks/08_fine_tuning.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(
            f"target_modules must be a non-empty list of names, got {target_modules!r}"
        )
    targets = set(target_modules)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets
    ]
    if not found:
        raise ValueError(
            f"no nn.Linear in the model is named like one of {sorted(targets)}; "
            "look at [name for name, _ in model.named_modules()]"
        )
    freeze(model)
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout)
        )
    logger.info("LoRA (r=%d, alpha=%g) on %d layers", r, alpha, len(found))
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in ``model`` by its merged ``nn.Linear`` (in place)."""
    for name in list(lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).merge())
    return model


# --- the same through peft ----------------------------------------------------------------


def apply_peft_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str] = ("query", "value"),
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Inject ``peft``'s LoRA layers into ``model`` in place (``peft.inject_adapter_in_model``).

    ``peft`` freezes every parameter of ``model`` except the LoRA A and B matrices. Apply it
    to the pretrained tower (e.g. the MiniLM ``BertModel``, whose attention projections are
    named ``query``, ``key``, ``value``) rather than to the whole classifier, so that the
    task head, a separate module, stays trainable. ``peft.get_peft_model`` does the same
    and wraps the model in a ``PeftModel`` (with ``save_pretrained`` of the adapter only).

    Args:
        model: the module to adapt, e.g. a ``transformers.BertModel``.
        target_modules: last components of the linear layers' names.
        r, alpha, dropout: LoRA rank, ``lora_alpha`` and ``lora_dropout``.

    Returns:
        The same ``model``, with ``peft.tuners.lora.Linear`` layers in place.

    Taught in notebooks/08_fine_tuning.
    """
    from peft import LoraConfig, inject_adapter_in_model

    utils.positive_int(r=r)
    utils.positive_float(alpha=alpha)
    utils.fraction(dropout=dropout)
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(
            f"target_modules must be a non-empty list of names, got {target_modules!r}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )
    return inject_adapter_in_model(config, model)


__all__ = [
    "STRATEGIES",
    "param_groups",
    "parameter_summary",
    "count_parameters",
    "freeze",
    "unfreeze",
    "linear_probe",
    "top_k_layers",
    "full_finetune",
    "apply_strategy",
    "LoRALinear",
    "apply_lora",
    "lora_layers",
    "merge_lora",
    "apply_peft_lora",
]
