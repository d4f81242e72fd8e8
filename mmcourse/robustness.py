"""Robustness of multimodal models: adversarial attacks, adversarial training, corruptions.

The threat model (威胁模型) is explicit. An attacker controls some of the modalities of an
input and may change each controlled modality m by a perturbation delta_m that stays in a
ball of radius eps_m (in the input's own units: pixels in [0, 1], waveform samples in
[-1, 1]) and keeps the input in its valid range::

    max_{delta_m : ||delta_m||_p <= eps_m,  x_m + delta_m in [lo_m, hi_m]}  L(f(x + delta), y)

- :class:`RawInputModel` wraps a model over preprocessed features so that it takes the raw,
  *named* inputs of every modality; normalisation (standardisation, patches, log-mel) lives
  inside it, so budgets are in pixel / sample units and the attack sees the whole pipeline;
- :func:`pgd` is projected gradient descent (Madry et al. 2018) on any subset of the
  modalities, each with its own :class:`Budget` (L-inf or L2), with random start and
  restarts; :func:`fgsm` (Goodfellow et al. 2015) is its one-step case;
- :class:`AdversarialLoss` is adversarial training as a loss for :func:`mmcourse.train.fit`:
  PGD-AT, FGSM with random start ("fast" AT, Wong et al. 2020) and FGSM from zero;
- :func:`accuracy` and :func:`attack_accuracy` evaluate in eval mode;
- corruptions in the style of MultiBench (Liang et al. 2021): :func:`gaussian_noise`,
  :func:`occlude`, :func:`blur` on images; :func:`add_noise_snr`, :func:`time_mask` on
  audio; a missing modality through ``present``; and MultiBench's
  :func:`relative_robustness` and :func:`effective_robustness`.

Axis letters: B batch, C channels, H, W image side, T waveform samples, K classes.

Taught in notebooks/12_robustness_and_adversarial_learning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse import train, utils
from mmcourse.train import ShuffledBatches  # the course's one epoch sampler

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

NORMS = ("linf", "l2")
AT_METHODS = ("pgd", "fgsm_random_start", "fgsm")
RANGE_ATOL = 1e-6  # inputs may exceed their declared range by this much (float rounding)


# --- the model seen by the attacker -------------------------------------------------------


class RawInputModel(nn.Module):
    """A model over raw, named modality inputs with declared valid ranges.

    ``forward({"image": (B, ...), "audio": (B, ...)})`` applies each modality's
    ``preprocess`` module (normalisation, patching, log-mel...) and calls the wrapped model
    on the results: ``model([f_1, ..., f_M])`` (a list, in the order of ``ranges``) or, with
    ``as_list=False`` and one modality, ``model(f_1)``. Because preprocessing is inside,
    an attack on this wrapper perturbs the raw input, and its budget is in raw units.

    Args:
        model: the model over preprocessed inputs.
        ranges: ``{name: (lo, hi)}`` for every modality, in the model's input order.
        preprocess: ``{name: module}``; a modality without one goes in unchanged.
        as_list: call the model with a list (True) or, for one modality, a tensor.
        accepts_present: the model takes ``present=`` (B, M) or (M,) bool to mark missing
            modalities (:class:`mmcourse.fusion.FusionClassifier` does).

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ranges: Mapping[str, tuple[float, float]],
        preprocess: Mapping[str, nn.Module] | None = None,
        as_list: bool = True,
        accepts_present: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(ranges, Mapping) or len(ranges) == 0:
            raise ValueError(f"ranges must map each modality name to (lo, hi), got {ranges!r}")
        self.ranges: dict[str, tuple[float, float]] = {}
        for name, bounds in ranges.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"modality names must be non-empty strings, got {name!r}")
            lo, hi = (float(b) for b in bounds)
            if not lo < hi:
                raise ValueError(f"range of {name!r} must have lo < hi, got ({lo}, {hi})")
            self.ranges[name] = (lo, hi)
        preprocess = dict(preprocess or {})
        unknown = sorted(set(preprocess) - set(self.ranges))
        if unknown:
            raise ValueError(f"preprocess for unknown modalities {unknown}; known: {self.names}")
        if not as_list and len(self.ranges) != 1:
            raise ValueError("as_list=False needs exactly one modality")
        self.model = model
        self.preprocess = nn.ModuleDict({n: preprocess.get(n, nn.Identity()) for n in self.names})
        self.as_list, self.accepts_present = as_list, accepts_present

    @property
    def names(self) -> list[str]:
        """The modality names, in the model's input order."""
        return list(self.ranges)

    def check_inputs(self, inputs: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``inputs`` has every modality, one batch size, in range."""
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"expected a dict {{name: tensor}} with modalities {self.names}, "
                f"got {type(inputs).__name__}"
            )
        missing = [n for n in self.names if n not in inputs]
        extra = [n for n in inputs if n not in self.ranges]
        if missing or extra:
            raise ValueError(
                f"expected inputs for exactly the modalities {self.names}; missing {missing}, "
                f"unknown {extra}"
            )
        sizes = {n: inputs[n].shape[0] for n in self.names}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every modality needs the same batch size, got {sizes}")
        for name, (lo, hi) in self.ranges.items():
            x = inputs[name]
            if not torch.isfinite(x).all():
                raise ValueError(f"input {name!r} contains NaN or inf")
            low, high = x.min().item(), x.max().item()
            if low < lo - RANGE_ATOL or high > hi + RANGE_ATOL:
                raise ValueError(
                    f"input {name!r} lies in [{low:.4g}, {high:.4g}], outside its declared "
                    f"range [{lo:g}, {hi:g}] (clip it, or pass raw inputs: the normalisation "
                    "is inside the model)"
                )

    def forward(
        self, inputs: Mapping[str, Tensor], present: Tensor | Sequence[bool] | None = None
    ) -> Tensor:
        """``{name: raw input}`` -> (B, K) logits; ``present`` marks missing modalities."""
        features = [self.preprocess[n](inputs[n]) for n in self.names]
        if present is not None:
            if not self.accepts_present:
                raise ValueError("this model does not take present= (accepts_present=False)")
            return self.model(features, present=present)
        return self.model(features if self.as_list else features[0])


# --- budgets and the attacks --------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The perturbation an attacker may add to one modality.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    eps: float  # radius of the ball, in the input's own units (pixels, samples)
    norm: str = (
        "linf"  # "linf": every entry moves by at most eps; "l2": the whole change has norm <= eps
    )
    step_size: float | None = None  # alpha per step, absolute; None: rel_step_size * eps

    def __post_init__(self) -> None:
        ok = isinstance(self.eps, (int, float, np.number)) and not isinstance(self.eps, bool)
        if not ok or not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        utils.one_of("norm", self.norm, NORMS)
        if self.step_size is not None:
            utils.positive_float(step_size=self.step_size)


def _budgets(
    model: RawInputModel, budgets: Mapping[str, float | Budget], norm: str
) -> dict[str, Budget]:
    if not isinstance(model, RawInputModel):
        raise ValueError(
            f"attacks take a RawInputModel (named inputs with ranges), got {type(model).__name__}"
        )
    if not isinstance(budgets, Mapping) or len(budgets) == 0:
        raise ValueError(
            f"budgets must map at least one modality of {model.names} to an eps, got {budgets!r}"
        )
    unknown = [n for n in budgets if n not in model.ranges]
    if unknown:
        raise ValueError(
            f"cannot attack modality {unknown[0]!r}: the model has modalities {model.names}"
        )
    utils.one_of("norm", norm, NORMS)
    return {n: b if isinstance(b, Budget) else Budget(eps=b, norm=norm) for n, b in budgets.items()}


def project(delta: Tensor, *, eps: float, norm: str) -> Tensor:
    """Project each example's perturbation onto the ball ||delta_i||_p <= eps.

    L-inf: clip every entry to [-eps, eps]. L2: scale delta_i by min(1, eps / ||delta_i||_2)
    (as ``torchattacks.PGDL2``).

    Args:
        delta: (B, ...) perturbations.
        eps: the radius.
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        (B, ...) the projected perturbations.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    if norm == "linf":
        return delta.clamp(-eps, eps)
    utils.one_of("norm", norm, NORMS)
    norms = delta.flatten(1).norm(p=2, dim=1)  # (B,)
    factor = torch.clamp(eps / norms, max=1.0)  # eps / 0 = inf -> 1
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def ascent_direction(grad: Tensor, *, norm: str) -> Tensor:
    """The steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2.

    Args:
        grad: (B, ...) the gradient of the loss with respect to the input.
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        (B, ...) the direction.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    if norm == "linf":
        return grad.sign()
    utils.one_of("norm", norm, NORMS)
    norms = grad.flatten(1).norm(p=2, dim=1) + 1e-10  # (B,) as torchattacks.PGDL2
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def _random_start(x: Tensor, budget: Budget, generator: torch.Generator | None) -> Tensor:
    """A perturbation drawn uniformly in the L-inf ball, or in the L2 ball as torchattacks."""
    if budget.norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (2 * u - 1) * budget.eps
    d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    n = d.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
    r = torch.rand(n.shape, generator=generator, dtype=x.dtype).to(x.device)
    return d * r / n * budget.eps


def _per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)


def pgd(
    model: RawInputModel,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    budgets: Mapping[str, float | Budget],
    steps: int = 10,
    norm: str = "linf",
    rel_step_size: float | None = None,
    random_start: bool = False,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    present: Tensor | None = None,
    check: bool = True,
) -> dict[str, Tensor]:
    """Projected gradient descent (ascent on the loss) on the modalities in ``budgets``.

    For every attacked modality m, from delta_m = 0 (or a random point of the ball):

        1) g_m = grad_{delta_m} CE(f(x + delta), y)
        2) delta_m <- delta_m + alpha_m * dir(g_m)         (sign(g) for L-inf, g/||g|| for L2)
        3) delta_m <- Proj_{||.|| <= eps_m}(delta_m)        (the ball)
        4) delta_m <- clip(x_m + delta_m, lo_m, hi_m) - x_m (the valid range)

    ``steps`` times; the other modalities stay clean. With ``restarts > 1`` the attack runs
    again from random starts (the first run starts at 0 unless ``random_start``) and keeps,
    per example, a perturbation that fools the model if any run found one, else the one of
    highest loss - so more restarts never raise the accuracy. The model is used in the
    mode it is in (put it in eval mode to evaluate; :func:`attack_accuracy` does).

    Args:
        model: a :class:`RawInputModel`.
        inputs: ``{name: (B, ...)}`` raw inputs of every modality, inside their ranges.
        labels: (B,) true classes.
        budgets: ``{name: eps or Budget}`` for the attacked modalities.
        steps: number of steps (1 with ``rel_step_size=1`` and no random start is FGSM).
        norm: the norm of budgets given as plain numbers.
        rel_step_size: alpha_m = rel_step_size * eps_m where a Budget has no step_size;
            None: 2.5 / steps (Madry et al.), which can reach the ball's edge from anywhere.
        random_start: start from a uniform point of the ball instead of 0.
        restarts: runs of the attack, best per example kept.
        generator: for the random starts (on the CPU; moved to the inputs' device).
        present: passed to the model (missing modalities), if given.
        check: check modality names and input ranges first.

    Returns:
        ``{name: (B, ...)}`` the adversarial inputs of every modality (unattacked ones are
        the clean inputs), detached.

    Raises:
        ValueError: a negative eps, steps < 1, restarts < 1, a modality the model does not
            have, inputs outside their declared ranges.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    budgets = _budgets(model, budgets, norm)
    utils.positive_int(steps=steps, restarts=restarts)
    if rel_step_size is not None:
        utils.positive_float(rel_step_size=rel_step_size)
    if check:
        model.check_inputs(inputs)
    if labels.dim() != 1 or labels.shape[0] != next(iter(inputs.values())).shape[0]:
        raise ValueError(
            f"labels must be (B,) with the inputs' batch size, got {tuple(labels.shape)}"
        )
    rel = 2.5 / steps if rel_step_size is None else rel_step_size
    clean = {n: x.detach() for n, x in inputs.items()}
    best = dict(clean)
    best_loss = best_fooled = None
    for run in range(restarts):
        delta = {}
        for n, b in budgets.items():
            start = random_start or run > 0
            d = _random_start(clean[n], b, generator) if start and b.eps > 0 else None
            d = torch.zeros_like(clean[n]) if d is None else d
            lo, hi = model.ranges[n]
            delta[n] = (clean[n] + d).clamp(lo, hi) - clean[n]
        for _ in range(steps):
            for d in delta.values():
                d.requires_grad_(True)
            x = {n: clean[n] + delta[n] if n in delta else clean[n] for n in clean}
            loss = _per_example_loss(model(x, present=present), labels).sum()
            grads = torch.autograd.grad(loss, list(delta.values()), allow_unused=True)
            for (n, b), g in zip(budgets.items(), grads, strict=True):
                g = torch.zeros_like(delta[n]) if g is None else g  # a modality not read
                alpha = b.step_size if b.step_size is not None else rel * b.eps
                d = delta[n].detach() + alpha * ascent_direction(g, norm=b.norm)  # 1), 2)
                d = project(d, eps=b.eps, norm=b.norm)  # 3)
                lo, hi = model.ranges[n]
                delta[n] = (clean[n] + d).clamp(lo, hi) - clean[n]  # 4)
        adv = {n: (clean[n] + delta[n]).detach() if n in delta else clean[n] for n in clean}
        if restarts == 1:
            return adv
        with torch.no_grad():
            logits = model(adv, present=present)
            loss = _per_example_loss(logits, labels)  # (B,)
            fooled = logits.argmax(-1) != labels  # (B,)
        if best_loss is None:
            take = torch.ones_like(fooled)
        else:  # a fooling perturbation beats any other; otherwise the higher loss wins
            take = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
        best_loss = loss if best_loss is None else torch.where(take, loss, best_loss)
        best_fooled = fooled if best_fooled is None else best_fooled | fooled
        for n in delta:
            mask = take.view(-1, *([1] * (adv[n].dim() - 1)))
            best[n] = torch.where(mask, adv[n], best[n])
    return best


def fgsm(
    model: RawInputModel,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    budgets: Mapping[str, float | Budget],
    norm: str = "linf",
    random_start: bool = False,
    rel_step_size: float | None = None,
    generator: torch.Generator | None = None,
    present: Tensor | None = None,
    check: bool = True,
) -> dict[str, Tensor]:
    """The fast gradient sign method: one step x + eps * sign(grad_x L), clipped to the range.

    With ``random_start`` it is the FGSM of "fast" adversarial training (Wong et al. 2020):
    delta ~ U[-eps, eps], one step of alpha = ``rel_step_size`` * eps (default 1.25), then
    the projection. Without it, alpha defaults to eps (Goodfellow et al. 2015).

    Args:
        model, inputs, labels, budgets, norm, generator, present, check: as :func:`pgd`.
        random_start: start from a uniform point of the ball.
        rel_step_size: alpha / eps; None: 1.25 with a random start, else 1.

    Returns:
        ``{name: (B, ...)}`` adversarial inputs, detached.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    if rel_step_size is None:
        rel_step_size = 1.25 if random_start else 1.0
    return pgd(
        model,
        inputs,
        labels,
        budgets=budgets,
        steps=1,
        norm=norm,
        rel_step_size=rel_step_size,
        random_start=random_start,
        generator=generator,
        present=present,
        check=check,
    )


def random_noise_like(
    perturbation: Mapping[str, Tensor],
    clean: Mapping[str, Tensor],
    *,
    ranges: Mapping[str, tuple[float, float]],
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Random noise with the same per-example L2 norm *and* L-inf bound as a perturbation.

    For each perturbed modality: random signs times the absolute values of the attack's
    perturbation, shuffled within each example (so every example's norms are exactly
    those of the attack), then clipped to the range like the attack was. Unperturbed
    modalities stay clean.

    Args:
        perturbation: ``{name: (B, ...)}`` the adversarial inputs.
        clean: ``{name: (B, ...)}`` the clean inputs.
        ranges: ``{name: (lo, hi)}``.
        generator: CPU generator.

    Returns:
        ``{name: (B, ...)}`` the noisy inputs.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    out = {}
    for n, x in clean.items():
        delta = (perturbation[n] - x).flatten(1)  # (B, P)
        if not delta.any():
            out[n] = x
            continue
        B, P = delta.shape
        order = torch.argsort(torch.rand(B, P, generator=generator), dim=1).to(x.device)
        magnitude = delta.abs().gather(1, order)  # (B, P) shuffled
        signs = torch.randint(0, 2, (B, P), generator=generator).to(x.device) * 2 - 1
        lo, hi = ranges[n]
        out[n] = (x + (magnitude * signs).view_as(x)).clamp(lo, hi)
    return out


# --- evaluation -----------------------------------------------------------------------------


def _batches(inputs: Mapping[str, Tensor], labels: Tensor, batch_size: int):
    n = labels.shape[0]
    for i in range(0, n, batch_size):
        yield {k: v[i : i + batch_size] for k, v in inputs.items()}, labels[i : i + batch_size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def accuracy(
    model: RawInputModel,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    present: Tensor | Sequence[bool] | None = None,
    batch_size: int = 512,
    train_mode: bool = False,
) -> float:
    """Top-1 accuracy in eval mode (``train_mode=True`` only to show the pitfall).

    Args:
        model: a :class:`RawInputModel`.
        inputs: ``{name: (N, ...)}`` raw inputs (moved to the model's device per batch).
        labels: (N,).
        present: missing modalities, passed to the model.
        batch_size: examples per forward pass.
        train_mode: evaluate with dropout (and modality dropout, BatchNorm batch statistics)
            active - wrong, shown in the notebook's pitfall box.

    Returns:
        The accuracy in [0, 1].

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    model.check_inputs(inputs)
    return train.accuracy(
        model, dict(inputs), labels, present=present, batch_size=batch_size, train_mode=train_mode
    )


def attack_accuracy(
    model: RawInputModel,
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    *,
    attack: Callable[..., dict[str, Tensor]] = pgd,
    batch_size: int = 512,
    train_mode: bool = False,
    return_adversarial: bool = False,
    **attack_kwargs,
) -> float | tuple[float, dict[str, Tensor]]:
    """Accuracy on adversarial inputs: the attack is built and evaluated in eval mode.

    Args:
        model: a :class:`RawInputModel`.
        inputs: ``{name: (N, ...)}`` clean raw inputs.
        labels: (N,).
        attack: :func:`pgd` or :func:`fgsm` (or any function of the same signature).
        batch_size: examples per attack batch.
        train_mode: build and evaluate the attack in train mode (the pitfall).
        return_adversarial: also return the adversarial inputs (on the CPU).
        **attack_kwargs: ``budgets=...``, ``steps=...`` and the rest, passed to ``attack``.

    Returns:
        The accuracy, and with ``return_adversarial`` the adversarial inputs too.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    model.check_inputs(inputs)
    was_training = model.training
    model.train(train_mode)
    device = _device(model)
    correct, adversarial = 0, []
    present = attack_kwargs.get("present")
    for x, y in _batches(inputs, labels, batch_size):
        x, y = {k: v.to(device) for k, v in x.items()}, y.to(device)
        adv = attack(model, x, y, check=False, **attack_kwargs)
        with torch.no_grad():
            correct += (model(adv, present=present).argmax(-1) == y).sum().item()
        if return_adversarial:
            adversarial.append({k: v.cpu() for k, v in adv.items()})
    model.train(was_training)
    acc = correct / labels.shape[0]
    if not return_adversarial:
        return acc
    return acc, {k: torch.cat([a[k] for a in adversarial]) for k in inputs}


# --- adversarial training as a loss for train.fit ------------------------------------------


@dataclass
class AdversarialLoss:
    """Adversarial training (对抗训练) as a ``loss_fn(model, batch)`` for ``train.fit``.

    min_theta E[ max_{delta in ball} CE(f_theta(x + delta), y) ]: each batch
    ``(inputs, labels)`` is first attacked (in eval mode, so that dropout and modality
    dropout do not randomise the attack; gradients only to the inputs), then the
    cross-entropy on the adversarial inputs is returned, mixed with the clean one by
    ``clean_weight``.

    - ``"pgd"``: PGD-AT (Madry et al. 2018), ``steps`` steps from a random start;
    - ``"fgsm_random_start"``: "fast" AT (Wong et al. 2020), one step of ``rel_step_size``
      * eps (default 1.25) from a uniform random start;
    - ``"fgsm"``: one step of eps from zero - prone to catastrophic overfitting.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    budgets: Mapping[str, float | Budget]  # {modality: eps or Budget}, the attacked modalities
    method: str = "pgd"  # "pgd" | "fgsm_random_start" | "fgsm"
    steps: int = 5  # PGD steps (method "pgd" only)
    rel_step_size: float | None = (
        None  # alpha / eps; None: 2.5/steps (pgd), 1.25 (fast AT), 1 (fgsm)
    )
    clean_weight: float = 0.0  # loss = (1 - w) * CE(adversarial) + w * CE(clean)
    attack_in_eval_mode: bool = True  # build the attack with dropout off
    seed: int = 0  # seeds the random starts

    def __post_init__(self) -> None:
        utils.one_of("method", self.method, AT_METHODS)
        utils.positive_int(steps=self.steps)
        utils.fraction(clean_weight=self.clean_weight)
        if self.rel_step_size is not None:
            utils.positive_float(rel_step_size=self.rel_step_size)
        for b in self.budgets.values():
            if not isinstance(b, Budget):
                Budget(eps=b)  # raises on a negative eps
        self._generator = torch.Generator().manual_seed(self.seed)

    def attack(self, model: RawInputModel, inputs: Mapping[str, Tensor], labels: Tensor):
        """The adversarial inputs of one batch (the model's mode is restored)."""
        was_training = model.training
        if self.attack_in_eval_mode:
            model.eval()
        kwargs = dict(budgets=self.budgets, generator=self._generator, check=False)
        if self.method == "pgd":
            adv = pgd(
                model,
                inputs,
                labels,
                steps=self.steps,
                rel_step_size=self.rel_step_size,
                random_start=True,
                **kwargs,
            )
        else:
            adv = fgsm(
                model,
                inputs,
                labels,
                random_start=self.method == "fgsm_random_start",
                rel_step_size=self.rel_step_size,
                **kwargs,
            )
        model.train(was_training)
        return adv

    def __call__(self, model: RawInputModel, batch: tuple[Mapping[str, Tensor], Tensor]) -> Tensor:
        inputs, labels = batch
        adv = self.attack(model, inputs, labels)
        loss = F.cross_entropy(model(adv), labels)
        if self.clean_weight > 0:
            clean = F.cross_entropy(model(inputs), labels)
            loss = (1 - self.clean_weight) * loss + self.clean_weight * clean
        return loss


def clean_loss(model: nn.Module, batch: tuple[Mapping[str, Tensor], Tensor]) -> Tensor:
    """Standard training: the cross-entropy of a ``(inputs, labels)`` batch (for ``fit``).

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def make_batches(
    inputs: Mapping[str, Tensor], labels: Tensor, *, batch_size: int, epochs: int, seed: int = 0
) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Shuffled mini-batches ``(inputs, labels)`` for ``train.fit``, ``epochs`` passes.

    Each epoch is a new permutation (seeded); the last, incomplete batch of an epoch is
    dropped so every step sees ``batch_size`` examples.

    Returns:
        A list of ``epochs * (N // batch_size)`` batches (views into the tensors).

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    utils.positive_int(batch_size=batch_size, epochs=epochs)
    n = labels.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) exceeds the {n} examples")
    names = list(inputs)
    sampler = ShuffledBatches(
        *(inputs[k] for k in names),
        labels,
        batch_size=batch_size,
        num_batches=epochs * (n // batch_size),
        seed=seed,
    )
    return [(dict(zip(names, batch[:-1], strict=True)), batch[-1]) for batch in sampler]


# --- corruptions (MultiBench style) ---------------------------------------------------------


def _check_images(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got {tuple(images.shape)}")


def _check_waveforms(waveforms: Tensor) -> None:
    if waveforms.dim() != 2:
        raise ValueError(f"expected waveforms (B, T), got {tuple(waveforms.shape)}")


def gaussian_noise(
    images: Tensor,
    *,
    std: float,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Add N(0, std^2) noise to every pixel, then clip to the valid range.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    _check_images(images)
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    return (images + std * noise).clamp(*value_range)


def occlude(images: Tensor, *, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Set one random square patch covering about ``fraction`` of each image to 0.

    The square's side is round(sqrt(fraction) * H) (H = W assumed only for the side), its
    position uniform per image.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    _check_images(images)
    utils.fraction(fraction=fraction)
    B, _, H, W = images.shape
    side_h = round(math.sqrt(fraction) * H)
    side_w = round(math.sqrt(fraction) * W)
    if side_h == 0 or side_w == 0:
        return images.clone()
    top = torch.randint(0, H - side_h + 1, (B,), generator=generator)  # (B,)
    left = torch.randint(0, W - side_w + 1, (B,), generator=generator)  # (B,)
    rows = torch.arange(H)[None, :, None]  # (1, H, 1)
    cols = torch.arange(W)[None, None, :]  # (1, 1, W)
    hidden = (
        (rows >= top[:, None, None])
        & (rows < (top + side_h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + side_w)[:, None, None])
    )  # (B, H, W)
    return images.masked_fill(hidden[:, None].to(images.device), 0.0)


def blur(images: Tensor, *, sigma: float) -> Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels (edges replicated).

    A separable kernel of radius ceil(3 sigma), normalised to sum 1, along rows then columns.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    _check_images(images)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return images.clone()
    B, C, H, W = images.shape
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (2r+1,)
    x = images.reshape(B * C, 1, H, W)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # along rows
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # along columns
    return x.reshape(B, C, H, W)


def add_noise_snr(
    waveforms: Tensor,
    *,
    snr_db: float,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """Add white Gaussian noise at a signal-to-noise ratio, then clip to the valid range.

    The signal power is the mean of x^2 over each whole clip as given (noise already in
    it counts as signal); the noise variance is that power / 10^(snr_db / 10).

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    _check_waveforms(waveforms)
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be a finite number of dB, got {snr_db!r}")
    power = waveforms.pow(2).mean(1, keepdim=True)  # (B, 1)
    std = (power / 10 ** (snr_db / 10)).sqrt()  # (B, 1)
    noise = torch.randn(waveforms.shape, generator=generator).to(waveforms.device)
    return (waveforms + std * noise).clamp(*value_range)


def time_mask(
    waveforms: Tensor, *, fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """Silence one random span of ``fraction`` of each clip (SpecAugment's time mask).

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    _check_waveforms(waveforms)
    utils.fraction(fraction=fraction)
    B, T = waveforms.shape
    width = round(fraction * T)
    if width == 0:
        return waveforms.clone()
    start = torch.randint(0, T - width + 1, (B,), generator=generator)  # (B,)
    t = torch.arange(T)[None, :]  # (1, T)
    hidden = (t >= start[:, None]) & (t < (start + width)[:, None])  # (B, T)
    return waveforms.masked_fill(hidden.to(waveforms.device), 0.0)


def relative_robustness(accuracies: Sequence[float], *, spacing: float = 0.1) -> float:
    """MultiBench's relative robustness: the area under the accuracy-vs-level curve.

    The levels are equally spaced, ``spacing`` apart (MultiBench: 0, 0.1, 0.2, ...), the
    first being the clean input; the area is the trapezoid rule. (MultiBench then min-max
    normalises it over the methods compared; that step is left to the caller.)

    Args:
        accuracies: accuracy at each imperfection level, clean first.
        spacing: the distance between levels.

    Returns:
        The area.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    acc = np.asarray(accuracies, dtype=float)
    if acc.ndim != 1 or acc.size < 2:
        raise ValueError(f"need the accuracy at 2 or more levels, got {accuracies!r}")
    utils.positive_float(spacing=spacing)
    return float(((acc[1:] + acc[:-1]) * spacing / 2).sum())


def effective_robustness(accuracies: Sequence[float], reference: Sequence[float]) -> float:
    """MultiBench's effective robustness: accuracy kept beyond a reference's, clean-equalised.

    With f the method's accuracies and r the reference's (MultiBench: late fusion) at the
    same levels, clean first: sum_l (f_l - (r_l + f_0 - r_0)). Positive: the method loses
    less accuracy than the reference does, once both start from the same clean accuracy.

    Args:
        accuracies: the method's accuracy at each level.
        reference: the reference model's accuracy at the same levels.

    Returns:
        The sum.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    f, r = np.asarray(accuracies, dtype=float), np.asarray(reference, dtype=float)
    if f.ndim != 1 or f.shape != r.shape or f.size < 1:
        raise ValueError(
            f"accuracies and reference need the same levels, got {f.shape} and {r.shape}"
        )
    return float((f - (r + f[0] - r[0])).sum())


# --- preprocessing for AV-Digits ------------------------------------------------------------


class Standardize(nn.Module):
    """x -> (x - mean) / std with fixed statistics over the last axis (buffers move with .to)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageTokens(nn.Module):
    """(B, 1, H, W) pixels in [0, 1] -> (B, N, P*P) standardised patch tokens (chapter 05).

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    def __init__(self, train_images: Tensor, *, patch_size: int = 2, eps: float = 1e-6) -> None:
        super().__init__()
        from mmcourse.modalities import patchify

        self.patchify, self.patch_size = patchify, patch_size
        tokens = patchify(train_images, patch_size)  # (N, T, F)
        self.standardize = Standardize(tokens.mean((0, 1)), tokens.std((0, 1)).clamp_min(eps))

    def forward(self, images: Tensor) -> Tensor:
        return self.standardize(self.patchify(images, self.patch_size))


class AudioTokens(nn.Module):
    """(B, T) waveform samples in [-1, 1] -> (B, M, J) standardised log-mel tokens.

    Log-mel in dB (:func:`mmcourse.audio.log_mel_spectrogram`, differentiable), one token
    per frame, standardised with training statistics: the whole front end is inside the
    model, so an attack perturbs samples. The defaults are a cheaper front end than
    chapter 05's (one 64 ms frame every 40 ms with 20 mel bands instead of 40 bands every
    10 ms pooled 2 x 4): the same (26, 20) token grid at about 40 % of the cost of a
    forward and backward pass, which adversarial training pays many times per step.

    Args:
        train_waveforms: (N, T) training clips, for the statistics.
        sample_rate: samples per second.
        n_fft: frame length in samples.
        hop_length: step between frames in samples.
        n_mels: J, mel bands.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    def __init__(
        self,
        train_waveforms: Tensor,
        *,
        sample_rate: int = 8000,
        n_fft: int = 512,
        hop_length: int = 320,
        n_mels: int = 20,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        utils.positive_int(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = (
            sample_rate,
            n_fft,
            hop_length,
            n_mels,
        )
        with torch.no_grad():
            tokens = torch.cat([self._tokens(w) for w in train_waveforms.split(256)])
        self.standardize = Standardize(tokens.mean((0, 1)), tokens.std((0, 1)).clamp_min(eps))

    def _tokens(self, waveforms: Tensor) -> Tensor:
        from mmcourse.audio import log_mel_spectrogram

        logmel = log_mel_spectrogram(
            waveforms,
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.n_mels,
        )  # (B, J, M)
        return logmel.transpose(1, 2)  # (B, M, J): one token per frame

    def forward(self, waveforms: Tensor) -> Tensor:
        return self.standardize(self._tokens(waveforms))


# --- a small convolutional image tower (catastrophic overfitting) ---------------------------


@dataclass
class ConvTowerConfig:
    """A small ReLU + BatchNorm CNN over one-channel images.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    image_size: int = 8  # H = W of the input images
    width: int = 32  # channels of the first convolution (the second has twice as many)
    upsample: int = 2  # nearest-neighbour upsampling factor inside the model (1: none)
    hidden: int = 100  # units of the hidden dense layer
    num_classes: int = 10  # K
    batch_norm: bool = True  # BatchNorm after each convolution

    def __post_init__(self) -> None:
        utils.positive_int(
            image_size=self.image_size,
            width=self.width,
            upsample=self.upsample,
            hidden=self.hidden,
            num_classes=self.num_classes,
        )
        if (self.image_size * self.upsample) % 2:
            raise ValueError(
                f"image_size * upsample must be even (a stride-2 convolution halves it), got "
                f"{self.image_size} * {self.upsample}"
            )


class ConvImageTower(nn.Module):
    """(B, 1, H, W) pixels in [0, 1] -> (B, K) logits: the classic small CNN of fast-AT studies.

    x -> nearest upsampling by ``upsample`` (inside the model: an attack still perturbs the
    H x W pixels) -> conv 3x3 (width) -> BN -> ReLU -> conv 3x3 stride 2 (2 width) -> BN ->
    ReLU -> dense (hidden) -> ReLU -> dense (K). Pixels are centred (x - 0.5) first. ReLU
    networks with BatchNorm are where FGSM training without a random start overfits
    catastrophically (Wong et al. 2020); upsampling gives the convolutions finer feature
    maps, and more capacity, at the same input size.

    Args:
        config: a :class:`ConvTowerConfig`.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """

    def __init__(self, config: ConvTowerConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ConvTowerConfig()
        w = c.width

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if c.batch_norm else nn.Identity()

        side = c.image_size * c.upsample // 2  # after the stride-2 convolution
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            norm(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2),
            norm(2 * w),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * w * side * side, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.num_classes)
        )

    def forward(self, images: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, K) logits."""
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, size, size):
            raise ValueError(f"expected images (B, 1, {size}, {size}), got {tuple(images.shape)}")
        x = images - 0.5  # (B, 1, H, W) centred
        if self.config.upsample > 1:
            x = F.interpolate(
                x, scale_factor=self.config.upsample, mode="nearest"
            )  # (B, 1, uH, uW)
        return self.head(self.features(x))  # (B, K)


# --- the chapter's explorer -------------------------------------------------------------------

ATTACKED = ("image", "audio", "both")  # what the explorer's attacker may change


def draw_attack_example(
    fig: Figure,
    *,
    model: RawInputModel,
    inputs: Mapping[str, Tensor],
    label: int,
    eps: float,
    attacked: str,
    audio_ratio: float,
    steps: int = 10,
    window: tuple[int, int] = (4000, 4200),
) -> Tensor:
    """One AV-Digits example, clean and under PGD: the explorer of chapter 12.

    Five panels in a row: the clean image; the attacked image; the image change divided by
    eps (so the amplified perturbation is visible); a window of the recording (grey) with
    the audio change (red, scaled by 0.5 / its eps); the model's class probabilities on the
    clean and on the attacked input.

    Args:
        fig: an empty figure to draw into.
        model: a :class:`RawInputModel` with modalities ``"image"`` and ``"audio"``.
        inputs: ``{"image": (1, 1, H, W), "audio": (1, T)}`` one clean example.
        label: its true class.
        eps: the image budget (L-inf, pixels); the audio budget is ``eps * audio_ratio``.
        attacked: ``"image"``, ``"audio"`` or ``"both"``.
        audio_ratio: audio eps / image eps.
        steps: PGD steps.
        window: the samples ``[start, stop)`` of the recording shown.

    Returns:
        (K,) the model's class probabilities on the attacked input.

    Taught in notebooks/12_robustness_and_adversarial_learning.
    """
    utils.one_of("attacked", attacked, ATTACKED)
    utils.positive_int(steps=steps)
    Budget(eps=eps)  # raises on a negative eps
    utils.positive_float(audio_ratio=audio_ratio)
    if set(model.names) != {"image", "audio"}:
        raise ValueError(f"the model must take 'image' and 'audio', it takes {model.names}")
    model.check_inputs(inputs)
    if inputs["image"].shape[0] != 1:
        raise ValueError(f"expected one example, got a batch of {inputs['image'].shape[0]}")
    start, stop = window
    if not 0 <= start < stop <= inputs["audio"].shape[-1]:
        raise ValueError(
            f"window must satisfy 0 <= start < stop <= {inputs['audio'].shape[-1]}, got {window}"
        )
    model.eval()
    device = _device(model)
    x = {k: v.to(device) for k, v in inputs.items()}
    y = torch.tensor([int(label)], device=device)
    budgets = {"image": eps, "audio": eps * audio_ratio}
    if attacked != "both":
        budgets = {attacked: budgets[attacked]}
    adv = pgd(model, x, y, budgets=budgets, steps=steps, check=False) if eps > 0 else x
    with torch.no_grad():
        clean_probs = model(x).softmax(-1)[0].float().cpu()  # (K,)
        probs = model(adv).softmax(-1)[0].float().cpu()  # (K,)
    image, image_adv = x["image"][0, 0].cpu(), adv["image"][0, 0].cpu()  # (H, W)
    wave, wave_adv = x["audio"][0].cpu(), adv["audio"][0].cpu()  # (T,)
    axes = fig.subplots(1, 5, gridspec_kw={"width_ratios": [1, 1, 1, 2, 2]})
    what = {"image": "image", "audio": "audio", "both": "image + audio"}[attacked]
    for ax, img, title in ((axes[0], image, "clean image"), (axes[1], image_adv, "attacked image")):
        ax.imshow(img.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    delta = (image_adv - image) / (eps if eps > 0 else 1.0)  # (H, W) in [-1, 1]
    axes[2].imshow(delta.numpy(), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    axes[2].set_title("image change / eps", fontsize=9)
    for ax in axes[:3]:
        ax.set_xticks([])
        ax.set_yticks([])
    audio_eps = eps * audio_ratio
    axes[3].plot(wave[start:stop].numpy(), color="0.6", lw=0.8)
    change = (wave_adv - wave)[start:stop] / (audio_eps if audio_eps > 0 else 1.0) * 0.5
    axes[3].plot(change.numpy(), color="#C44E52", lw=0.8)
    axes[3].set_title("audio window: recording (grey), change x 0.5/eps (red)", fontsize=8)
    axes[3].set_xticks([])
    classes = np.arange(probs.shape[0])
    axes[4].bar(classes - 0.2, clean_probs.numpy(), width=0.4, color="0.7", label="clean")
    colours = ["#55A868" if k == int(label) else "#4C72B0" for k in classes]
    axes[4].bar(classes + 0.2, probs.numpy(), width=0.4, color=colours, label="attacked")
    axes[4].set_xticks(classes)
    axes[4].set_ylim(0, 1)
    axes[4].legend(fontsize=7, loc="upper right")
    axes[4].set_title(
        f"prediction: {int(clean_probs.argmax())} -> {int(probs.argmax())} (true {int(label)})",
        fontsize=9,
    )
    fig.suptitle(f"PGD-{steps} on the {what}, image eps = {eps:.2f}, audio eps = {audio_eps:.4f}")
    return probs


__all__ = [
    "NORMS",
    "AT_METHODS",
    "RawInputModel",
    "Budget",
    "project",
    "ascent_direction",
    "pgd",
    "fgsm",
    "random_noise_like",
    "accuracy",
    "attack_accuracy",
    "AdversarialLoss",
    "clean_loss",
    "make_batches",
    "gaussian_noise",
    "occlude",
    "blur",
    "add_noise_snr",
    "time_mask",
    "relative_robustness",
    "effective_robustness",
    "Standardize",
    "ImageTokens",
    "AudioTokens",
    "ConvTowerConfig",
    "ConvImageTower",
    "ATTACKED",
    "draw_attack_example",
]
