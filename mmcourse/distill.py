"""Knowledge distillation: soft labels with temperature, attention maps, hidden states.

A large **teacher** is trained first; a small **student** then learns to imitate it
(004 §4.3). Three signals can be copied, from the output inwards:

* soft labels (Hinton et al., 2015): the teacher's class distribution softened by a
  temperature T, matched with a KL divergence scaled by T² so that its gradient keeps
  its size whatever T is::

      p^T = softmax(z / T)
      L_KD = alpha * T² * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, softmax(z_s))

  with the KL summed over classes and averaged over the batch (``batchmean``);
* attention maps (TinyBERT, MiniLM): the student's self-attention distributions of some
  layers pulled towards the teacher's of the layers they are mapped to;
* hidden states (TinyBERT): the student's token vectors, mapped by a learned linear
  projection W from the student's width to the teacher's, pulled towards the teacher's
  with a mean squared error.

:class:`DistillConfig` weighs the terms and :class:`Distiller` adds them up.
:class:`TextClassifier` wraps a :class:`~mmcourse.encoders.TextEncoder` (the teacher, a
pretrained MiniLM, or a tiny student) and exposes every layer's hidden states and
attention maps; :func:`compact_vocabulary` gives a student a small embedding table over the
teacher's tokenizer, so both see the same tokens and their attention maps align.

Axis letters: B batch, C classes, N tokens, H heads, Ds / Dt student / teacher width,
V vocabulary.

Taught in notebooks/09_knowledge_distillation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.encoders import TextEncoder
from mmcourse.utils import fraction, one_of, positive_float, positive_int

logger = logging.getLogger(__name__)

ATTENTION_LOSSES = ("kl", "mse")
HEAD_MODES = ("mean", "match")


# --- soft labels -----------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    positive_float(temperature=temperature)


def softmax_with_temperature(logits: Tensor, temperature: float) -> Tensor:
    """The softened softmax p_i = exp(z_i / T) / sum_j exp(z_j / T) over the last axis.

    Args:
        logits: (..., C) logits z.
        temperature: T > 0; T = 1 is the ordinary softmax, larger T flattens it.

    Returns:
        (..., C) probabilities.

    Taught in notebooks/09_knowledge_distillation.
    """
    _check_temperature(temperature)
    return torch.softmax(logits / temperature, dim=-1)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(
            f"expected student_logits of shape (B, C), got {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"expected teacher_logits of the shape of student_logits "
            f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )


def soft_label_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, t_squared: bool = True
) -> Tensor:
    """T² * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes, averaged over B.

    Args:
        student_logits: (B, C) z_s.
        teacher_logits: (B, C) z_t; detached (the teacher gets no gradient).
        temperature: T > 0.
        t_squared: multiply by T² (Hinton et al.), so that the gradient's size does not
            shrink as 1/T² when T grows. ``False`` only to show what goes wrong.

    Returns:
        A scalar.

    Taught in notebooks/09_knowledge_distillation.
    """
    _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)  # (B, C)
    # batchmean: sum over classes, mean over the batch - the KL divergence per example.
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2 if t_squared else kl


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    alpha: float = 0.5,
    labels: Tensor | None = None,
    t_squared: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Hinton's distillation loss: soft-label KL (times T²) mixed with the hard-label CE.

    ``alpha * T² * KL(p_t^T || p_s^T) + (1 - alpha) * CE(labels, z_s)``, where the KL is
    summed over classes and averaged over the B examples (``batchmean``) and the CE is the
    ordinary cross-entropy at temperature 1, averaged over the labelled examples.

    Args:
        student_logits: (B, C) z_s.
        teacher_logits: (B, C) z_t; detached.
        temperature: T > 0.
        alpha: weight of the soft term in [0, 1] when ``labels`` are given.
        labels: (B,) class ids, ``ignore_index`` for unlabelled examples (they still get
            the soft term); None: no hard term, the soft term alone is returned (unweighted).
        t_squared: multiply the soft term by T².
        ignore_index: the label of unlabelled examples.

    Returns:
        A scalar.

    Taught in notebooks/09_knowledge_distillation.
    """
    fraction(alpha=alpha)
    soft = soft_label_loss(
        student_logits, teacher_logits, temperature=temperature, t_squared=t_squared
    )
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * hard_label_loss(
        student_logits, labels, ignore_index=ignore_index
    )


def hard_label_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Cross-entropy over the labelled examples; 0 (with a gradient path) if there are none.

    Args:
        logits: (B, C).
        labels: (B,) class ids or ``ignore_index``.

    Returns:
        A scalar.

    Taught in notebooks/09_knowledge_distillation.
    """
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"expected labels of shape (B,) = {tuple(logits.shape[:1])} with integer dtype, "
            f"got {tuple(labels.shape)} {labels.dtype}"
        )
    labelled = labels != ignore_index  # (B,)
    if not labelled.any():
        return logits.sum() * 0.0  # no labelled example in this batch
    bad = labels[labelled]
    if bad.min() < 0 or bad.max() >= logits.shape[1]:
        raise ValueError(
            f"labels must be in [0, C={logits.shape[1]}) or ignore_index={ignore_index}, got "
            f"{int(bad.min())} to {int(bad.max())}"
        )
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


# --- attention maps --------------------------------------------------------------------------


def uniform_layer_map(num_student: int, num_teacher: int) -> dict[int, int]:
    """TinyBERT's uniform layer map g(m) = ceil(m * L_t / L_s), blocks counted from 1.

    Student block m (1..L_s) learns from teacher block g(m); the last block always maps to
    the last (g(L_s) = L_t). Counted from 1, the result is directly a ``hidden_layer_map``
    (``hidden_states[m]`` is the output of block m; 0, the embeddings, is not mapped); for
    an ``attention_layer_map`` subtract 1 from both sides (block m's map is
    ``attentions[m - 1]``).

    Args:
        num_student: L_s, the student's blocks.
        num_teacher: L_t, the teacher's blocks.

    Returns:
        ``{m: g(m)}`` for m = 1..L_s, e.g. ``{1: 3, 2: 6}`` for 2 and 6 blocks,
        ``{1: 2, 2: 3, 3: 5, 4: 6}`` for 4 and 6.

    Taught in notebooks/09_knowledge_distillation.
    """
    positive_int(num_student=num_student, num_teacher=num_teacher)
    return {m: math.ceil(m * num_teacher / num_student) for m in range(1, num_student + 1)}


def _check_layer_map(layer_map: Mapping[int, int], num_student: int, num_teacher: int) -> None:
    if not isinstance(layer_map, Mapping) or not layer_map:
        raise ValueError(
            f"layer_map must be a non-empty dict {{student: teacher}}, got {layer_map!r}"
        )
    for s, t in layer_map.items():
        if not 0 <= s < num_student or not 0 <= t < num_teacher:
            raise ValueError(
                f"layer_map entry {s}: {t} is out of range: the student has {num_student} "
                f"and the teacher {num_teacher} layers here (indices from 0)"
            )


def _token_weights(mask: Tensor | None, B: int, N: int, device: torch.device) -> Tensor:
    """(B, N) float weights, 1 for real tokens and 0 for padding."""
    if mask is None:
        return torch.ones(B, N, device=device)
    if mask.shape != (B, N):
        raise ValueError(
            f"expected attention_mask of shape (B, N) = {(B, N)}, got {tuple(mask.shape)}"
        )
    return mask.to(device=device, dtype=torch.float32)


def attention_map_loss(
    student_attn: Tensor,
    teacher_attn: Tensor,
    *,
    loss: str = "kl",
    heads: str = "mean",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """How far one student attention map is from one teacher map.

    Args:
        student_attn: (B, Hs, N, N) attention probabilities (each query row sums to 1).
        teacher_attn: (B, Ht, N, N); detached.
        loss: ``"kl"``: KL(teacher row || student row) summed over keys (MiniLM);
            ``"mse"``: squared difference of the probabilities (TinyBERT uses the MSE too,
            on the scores before the softmax, which our encoder does not return).
        heads: ``"match"``: head h to head h, needs Hs == Ht (TinyBERT, MiniLM);
            ``"mean"``: average the heads of each model first, which works for any two
            head counts but keeps only the heads' consensus.
        attention_mask: (B, N) 1 for real tokens, 0 for padding; padded query rows and key
            columns are left out. None: no padding.

    Returns:
        A scalar: the KL per query row (or the squared error per entry), averaged over the
        real query rows (entries), the heads and the batch.

    Taught in notebooks/09_knowledge_distillation.
    """
    one_of("loss", loss, ATTENTION_LOSSES)
    one_of("heads", heads, HEAD_MODES)
    if student_attn.dim() != 4 or student_attn.shape[-1] != student_attn.shape[-2]:
        raise ValueError(
            f"expected student_attn of shape (B, H, N, N), got {tuple(student_attn.shape)}"
        )
    if teacher_attn.dim() != 4 or teacher_attn.shape[-1] != teacher_attn.shape[-2]:
        raise ValueError(
            f"expected teacher_attn of shape (B, H, N, N), got {tuple(teacher_attn.shape)}"
        )
    B, Hs, N, _ = student_attn.shape
    if teacher_attn.shape[0] != B or teacher_attn.shape[-1] != N:
        raise ValueError(
            f"student and teacher attention maps must share B and N, got "
            f"{tuple(student_attn.shape)} and {tuple(teacher_attn.shape)}"
        )
    teacher_attn = teacher_attn.detach()
    if heads == "mean":
        student_attn = student_attn.mean(dim=1, keepdim=True)  # (B, 1, N, N)
        teacher_attn = teacher_attn.mean(dim=1, keepdim=True)  # (B, 1, N, N)
    elif teacher_attn.shape[1] != Hs:
        raise ValueError(
            f'heads="match" needs as many student as teacher heads, got {Hs} and '
            f'{teacher_attn.shape[1]}; use heads="mean"'
        )
    w = _token_weights(attention_mask, B, N, student_attn.device)  # (B, N)
    H = student_attn.shape[1]
    if loss == "kl":
        # sum_k a_t log(a_t / a_s); zero teacher entries (padded keys) contribute 0.
        log_s = torch.log(student_attn.clamp_min(1e-12))
        per_row = (torch.xlogy(teacher_attn, teacher_attn) - teacher_attn * log_s).sum(
            -1
        )  # (B, H, N)
        return (per_row * w[:, None, :]).sum() / (w.sum() * H)
    pair = w[:, None, :, None] * w[:, None, None, :]  # (B, 1, N, N): real query and real key
    sq = (student_attn - teacher_attn) ** 2  # (B, H, N, N)
    return (sq * pair).sum() / (pair.sum() * H)


def attention_distill_loss(
    student_attn: Sequence[Tensor],
    teacher_attn: Sequence[Tensor],
    layer_map: Mapping[int, int],
    *,
    loss: str = "kl",
    heads: str = "mean",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The :func:`attention_map_loss` of each mapped pair of layers, averaged over the pairs.

    Args:
        student_attn: one (B, Hs, N, N) map per student block.
        teacher_attn: one (B, Ht, N, N) map per teacher block.
        layer_map: ``{student block: teacher block}``, list indices from 0 (block m counted
            from 1 is index m - 1), e.g. ``{0: 2, 1: 5}`` for a 2-block student and a 6-block
            teacher: :func:`uniform_layer_map` ``{1: 3, 2: 6}`` shifted by one.
        loss, heads, attention_mask: as in :func:`attention_map_loss`.

    Returns:
        A scalar.

    Taught in notebooks/09_knowledge_distillation.
    """
    _check_layer_map(layer_map, len(student_attn), len(teacher_attn))
    terms = [
        attention_map_loss(
            student_attn[s], teacher_attn[t], loss=loss, heads=heads, attention_mask=attention_mask
        )
        for s, t in layer_map.items()
    ]
    return torch.stack(terms).mean()


# --- hidden states ---------------------------------------------------------------------------


def hidden_state_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    projection: nn.Module | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """TinyBERT's MSE(h_s W + b, h_t), averaged over the real tokens and the teacher's width.

    Args:
        student_hidden: (B, N, Ds).
        teacher_hidden: (B, N, Dt); detached.
        projection: maps Ds to Dt (an ``nn.Linear(Ds, Dt)``, trained with the student);
            None only when Ds == Dt.
        attention_mask: (B, N) 1 for real tokens, 0 for padding; None: no padding.

    Returns:
        A scalar.

    Taught in notebooks/09_knowledge_distillation.
    """
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise ValueError(
            f"expected hidden states of shape (B, N, D), got {tuple(student_hidden.shape)} "
            f"and {tuple(teacher_hidden.shape)}"
        )
    B, N, Ds = student_hidden.shape
    if teacher_hidden.shape[:2] != (B, N):
        raise ValueError(
            f"student and teacher hidden states must share (B, N) = {(B, N)}, got "
            f"{tuple(teacher_hidden.shape)}"
        )
    projected = student_hidden if projection is None else projection(student_hidden)  # (B, N, Dt)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(
            f"student width {Ds} does not match the teacher's {teacher_hidden.shape[-1]}: pass a "
            f"projection such as nn.Linear({Ds}, {teacher_hidden.shape[-1]})"
        )
    w = _token_weights(attention_mask, B, N, student_hidden.device)  # (B, N)
    sq = ((projected - teacher_hidden.detach()) ** 2).mean(-1)  # (B, N)
    return (sq * w).sum() / w.sum()


class HiddenStateDistiller(nn.Module):
    """Hidden-state distillation with one learned projection Ds -> Dt per mapped student layer.

    (TinyBERT learns a single W_h shared by all layers. We learn one W_h^(m) per mapped
    layer: it costs Ds * Dt + Dt more weights per layer and lets each layer keep its own
    basis.)

    Args:
        student_dim: Ds.
        teacher_dim: Dt.
        layer_map: ``{student hidden-state index: teacher hidden-state index}``, where index 0
            is the embedding output and k the output of block k (as ``hidden_states`` of
            ``transformers`` and :class:`TextClassifier`), e.g. ``{1: 3, 2: 6}``.

    Taught in notebooks/09_knowledge_distillation.
    """

    def __init__(self, *, student_dim: int, teacher_dim: int, layer_map: Mapping[int, int]) -> None:
        super().__init__()
        positive_int(student_dim=student_dim, teacher_dim=teacher_dim)
        if not isinstance(layer_map, Mapping) or not layer_map:
            raise ValueError(
                f"layer_map must be a non-empty dict {{student: teacher}}, got {layer_map!r}"
            )
        self.layer_map = {int(s): int(t) for s, t in layer_map.items()}
        self.projections = nn.ModuleDict(
            {str(s): nn.Linear(student_dim, teacher_dim) for s in self.layer_map}
        )

    def forward(
        self,
        student_hidden: Sequence[Tensor],
        teacher_hidden: Sequence[Tensor],
        *,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The mean over mapped layers of :func:`hidden_state_loss`.

        Args:
            student_hidden: (B, N, Ds) per student layer (embeddings first).
            teacher_hidden: (B, N, Dt) per teacher layer (embeddings first); only the mapped
                ones are read, so a sequence with ``None`` elsewhere is fine.
            attention_mask: (B, N) or None.

        Returns:
            A scalar.
        """
        _check_layer_map(self.layer_map, len(student_hidden), len(teacher_hidden))
        terms = [
            hidden_state_loss(
                student_hidden[s],
                teacher_hidden[t],
                projection=self.projections[str(s)],
                attention_mask=attention_mask,
            )
            for s, t in self.layer_map.items()
        ]
        return torch.stack(terms).mean()


# --- the composite loss ----------------------------------------------------------------------


@dataclass
class DistillConfig:
    """The weight of each distillation term, and how each is computed.

    Taught in notebooks/09_knowledge_distillation.
    """

    temperature: float = 4.0  # T of the soft labels
    t_squared: bool = True  # multiply the soft term by T² (Hinton et al.); False only to compare
    soft_weight: float = 1.0  # weight of T² KL(p_t^T || p_s^T), on every example
    hard_weight: float = 1.0  # weight of the cross-entropy, on the labelled examples
    attention_weight: float = 0.0  # weight of the attention-map term (0: off)
    hidden_weight: float = 0.0  # weight of the hidden-state term (0: off)
    attention_layer_map: dict[int, int] = field(
        default_factory=dict
    )  # {student block: teacher block}
    hidden_layer_map: dict[int, int] = field(
        default_factory=dict
    )  # {student state: teacher state}, 0 = embeddings
    attention_loss: str = "kl"  # "kl" or "mse" between attention probabilities
    attention_heads: str = "mean"  # "mean": average heads first; "match": head to head
    ignore_index: int = -100  # label of the unlabelled examples

    def __post_init__(self) -> None:
        positive_float(temperature=self.temperature)
        for name in ("soft_weight", "hard_weight", "attention_weight", "hidden_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        one_of("attention_loss", self.attention_loss, ATTENTION_LOSSES)
        one_of("attention_heads", self.attention_heads, HEAD_MODES)
        if self.attention_weight > 0 and not self.attention_layer_map:
            raise ValueError("attention_weight > 0 needs an attention_layer_map {student: teacher}")
        if self.hidden_weight > 0 and not self.hidden_layer_map:
            raise ValueError("hidden_weight > 0 needs a hidden_layer_map {student: teacher}")


@dataclass
class DistillOutput:
    """What :class:`Distiller` returns."""

    loss: Tensor  # the weighted sum, a scalar to call backward() on
    terms: dict[str, Tensor]  # each term before weighting: "soft", "hard", "attention", "hidden"


class Distiller(nn.Module):
    """The weighted sum of the distillation terms that :class:`DistillConfig` switches on.

    ``loss = w_soft * T² KL + w_hard * CE + w_attn * L_attn + w_hidden * L_hidden``. It holds
    the trainable hidden-state projections, so train it together with the student.

    Args:
        config: the weights and options.
        student_dim: Ds (needed only for the hidden-state term).
        teacher_dim: Dt (needed only for the hidden-state term).

    Taught in notebooks/09_knowledge_distillation.
    """

    def __init__(
        self,
        config: DistillConfig,
        *,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.hidden = None
        if config.hidden_weight > 0:
            if student_dim is None or teacher_dim is None:
                raise ValueError("the hidden-state term needs student_dim and teacher_dim")
            self.hidden = HiddenStateDistiller(
                student_dim=student_dim, teacher_dim=teacher_dim, layer_map=config.hidden_layer_map
            )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        *,
        labels: Tensor | None = None,
        student_attentions: Sequence[Tensor] | None = None,
        teacher_attentions: Sequence[Tensor] | None = None,
        student_hidden: Sequence[Tensor] | None = None,
        teacher_hidden: Sequence[Tensor] | None = None,
        attention_mask: Tensor | None = None,
    ) -> DistillOutput:
        """Compute the terms with a non-zero weight and their weighted sum.

        Args:
            student_logits, teacher_logits: (B, C).
            labels: (B,) class ids or ``config.ignore_index``; None: no hard term.
            student_attentions, teacher_attentions: per-block (B, H, N, N) maps, needed
                when ``attention_weight > 0``.
            student_hidden, teacher_hidden: per-layer (B, N, D) states (embeddings first),
                needed when ``hidden_weight > 0``.
            attention_mask: (B, N) or None.

        Returns:
            :class:`DistillOutput`.
        """
        c = self.config
        terms: dict[str, Tensor] = {}
        if c.soft_weight > 0:
            terms["soft"] = soft_label_loss(
                student_logits, teacher_logits, temperature=c.temperature, t_squared=c.t_squared
            )
        if c.hard_weight > 0 and labels is not None:
            terms["hard"] = hard_label_loss(student_logits, labels, ignore_index=c.ignore_index)
        if c.attention_weight > 0:
            if student_attentions is None or teacher_attentions is None:
                raise ValueError(
                    "attention_weight > 0: pass student_attentions and teacher_attentions"
                )
            terms["attention"] = attention_distill_loss(
                student_attentions,
                teacher_attentions,
                c.attention_layer_map,
                loss=c.attention_loss,
                heads=c.attention_heads,
                attention_mask=attention_mask,
            )
        if self.hidden is not None:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError("hidden_weight > 0: pass student_hidden and teacher_hidden")
            terms["hidden"] = self.hidden(
                student_hidden, teacher_hidden, attention_mask=attention_mask
            )
        if not terms:
            raise ValueError(
                "every term is off: give at least one term a weight > 0 (and labels for 'hard')"
            )
        weights = {
            "soft": c.soft_weight,
            "hard": c.hard_weight,
            "attention": c.attention_weight,
            "hidden": c.hidden_weight,
        }
        loss = sum(weights[name] * value for name, value in terms.items())
        return DistillOutput(loss=loss, terms=terms)


# --- teacher and student: a text encoder with a classification head ----------------------------


@dataclass
class ClassifierOutput:
    """What :class:`TextClassifier` returns."""

    logits: Tensor  # (B, C)
    hidden_states: tuple[Tensor, ...] | None = None  # (B, N, D) per layer, embeddings first
    attentions: tuple[Tensor, ...] | None = None  # (B, H, N, N) per block


class TextClassifier(nn.Module):
    """A :class:`~mmcourse.encoders.TextEncoder` and a linear head on the mean of its real tokens.

    Used for both the teacher (MiniLM's weights copied in with
    :func:`mmcourse.encoders.load_from_bert`) and the student (a tiny config).

    Args:
        encoder: the text tower.
        num_classes: C.

    Taught in notebooks/09_knowledge_distillation.
    """

    def __init__(self, encoder: TextEncoder, *, num_classes: int) -> None:
        super().__init__()
        positive_int(num_classes=num_classes)
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.dim, num_classes)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ClassifierOutput:
        """Classify a batch of token ids.

        Args:
            input_ids: (B, N) token ids.
            attention_mask: (B, N) 1 for real tokens, 0 for padding; None: no padding.
            output_hidden_states: return the L + 1 hidden states (embeddings first).
            output_attentions: return the L attention maps.

        Returns:
            :class:`ClassifierOutput`.
        """
        self.encoder.check_inputs(input_ids, attention_mask, None)
        x = self.encoder.embeddings(input_ids, torch.zeros_like(input_ids))  # (B, N, D)
        return self.forward_from(
            x,
            attention_mask,
            start_layer=0,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    def forward_from(
        self,
        hidden: Tensor,
        attention_mask: Tensor | None = None,
        *,
        start_layer: int,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ClassifierOutput:
        """Run blocks ``start_layer``.. on cached hidden states (the input of that block).

        Lets a teacher whose lower blocks are frozen be fine-tuned on their outputs,
        computed once. The returned hidden states and attentions cover only the blocks run
        (hidden states: the input ``hidden`` first).

        Args:
            hidden: (B, N, D), the output of block ``start_layer - 1`` (of the embeddings for 0).
            attention_mask: (B, N) or None.
            start_layer: index of the first block to run, 0 <= start_layer <= L.

        Returns:
            :class:`ClassifierOutput`.
        """
        if not 0 <= start_layer <= self.num_layers:
            raise ValueError(f"start_layer must be in [0, {self.num_layers}], got {start_layer}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.encoder.config.dim:
            raise ValueError(
                f"expected hidden of shape (B, N, {self.encoder.config.dim}), got {tuple(hidden.shape)}"
            )
        B, N, _ = hidden.shape
        weights = _token_weights(attention_mask, B, N, hidden.device)  # (B, N)
        padding = None if attention_mask is None else attention_mask == 0  # (B, N) True = pad
        states, maps = [hidden], []
        x = hidden
        for block in self.encoder.blocks[start_layer:]:
            x, attn = block(x, key_padding_mask=padding, need_weights=output_attentions)
            states.append(x)
            maps.append(attn)
        pooled = (x * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)  # (B, D)
        return ClassifierOutput(
            logits=self.head(pooled),
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(maps) if output_attentions else None,
        )


def compact_vocabulary(
    input_ids: Tensor, *, vocab_size: int, keep: Sequence[int] = (0, 100, 101, 102)
) -> Tensor:
    """A lookup table from a large tokenizer's ids to a small student vocabulary.

    The student reads the same tokens as the teacher (so their attention maps align token
    for token) but only needs embedding rows for the ids that occur. Ids never seen map
    to the new id of ``keep[1]`` ([UNK] in BERT's vocabulary).

    Args:
        input_ids: any tensor of the ids that occur (e.g. the training set's).
        vocab_size: V of the tokenizer.
        keep: ids always kept, in this order first (BERT: [PAD] 0, [UNK] 100, [CLS] 101,
            [SEP] 102); ``keep[0]`` becomes 0, so the padding id stays 0.

    Returns:
        (V,) int64: ``lookup[old_id] = new_id``; ``lookup.max() + 1`` is the student's V.

    Taught in notebooks/09_knowledge_distillation.
    """
    positive_int(vocab_size=vocab_size)
    if len(keep) < 2:
        raise ValueError(f"keep must hold at least the padding and unknown ids, got {list(keep)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size})")
    seen = [i for i in torch.unique(input_ids).tolist() if i not in set(keep)]
    order = list(keep) + seen
    lookup = torch.full((vocab_size,), order.index(keep[1]), dtype=torch.int64)
    lookup[torch.tensor(order)] = torch.arange(len(order))
    return lookup


__all__ = [
    "softmax_with_temperature",
    "soft_label_loss",
    "hard_label_loss",
    "kd_loss",
    "uniform_layer_map",
    "attention_map_loss",
    "attention_distill_loss",
    "hidden_state_loss",
    "HiddenStateDistiller",
    "DistillConfig",
    "DistillOutput",
    "Distiller",
    "ClassifierOutput",
    "TextClassifier",
    "compact_vocabulary",
]
