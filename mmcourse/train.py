"""A small, honest training loop: AdamW, warm-up + decay schedule, clipping, early stopping.

The loop every fine-tuning run of the course goes through (000 §4.2, 003 §4.1)::

    for step in 1..max_steps:
        loss = loss_fn(model, batch)             # forward, under bf16 autocast on CUDA
        loss.backward()                          # gradients
        clip_grad_norm_(params, grad_clip)       # g <- g * min(1, c / ||g||)
        optimizer.step(); scheduler.step()       # AdamW with decoupled weight decay
        every eval_every steps: evaluate, keep the best weights, maybe stop early

- :class:`TrainConfig` holds every knob, checked at construction;
- :func:`lr_at` is the schedule's multiplier (linear warm-up, then cosine / linear /
  constant down to ``min_lr_ratio``), :func:`make_scheduler` wraps it in a ``LambdaLR``;
- :func:`adamw_step` writes one AdamW update out by hand (the formulas of 003 §4.1 with
  decoupled weight decay), checked against ``torch.optim.AdamW`` in the tests;
- :func:`fit` runs the loop and returns a :class:`FitResult`; with ``checkpoint_path`` it
  saves model, optimiser, scheduler, step, history and best weights at every evaluation,
  and ``fit(..., resume=True)`` continues from there to the same final weights. The
  checkpoint holds only tensors and plain Python values and is read back with
  ``torch.load(weights_only=True)``: a file that holds anything else (a pickled object,
  which could run code when loaded) is refused. It is written through a temporary file
  and a rename, so an interrupted save leaves the previous checkpoint intact.

Under ``torchrun`` every process calls ``fit`` with its model wrapped in
``DistributedDataParallel`` and its own shard of each batch: the loop only touches
``model.parameters()`` and ``state_dict()``, a plain ``"cuda"`` device becomes the process's
``cuda:LOCAL_RANK``, and only rank 0 writes the checkpoint (tests/test_train.py checks that
2 gloo processes end with the weights of one process on the whole batches).

Taught in notebooks/08_fine_tuning.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmcourse import utils

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
MODES = ("max", "min")


@dataclass
class TrainConfig:
    """Everything :func:`fit` needs to know; checked when built.

    Taught in notebooks/08_fine_tuning.
    """

    max_steps: int = 200  # optimiser steps in total
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay (biases and norms excluded)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2)
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    schedule: str = "cosine"  # after warm-up: "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.0  # floor of the decay as a fraction of lr
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    eval_every: int = 50  # steps between evaluations (and at the last step)
    patience: int | None = None  # evaluations without improvement before stopping; None: never
    metric: str = "accuracy"  # key of evaluate_fn's dict to monitor
    mode: str = "max"  # "max" or "min": which direction of the metric is better
    restore_best: bool = True  # load the best evaluated weights at the end
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, float32 elsewhere; "bf16"; "fp32"
    checkpoint_path: str | None = None  # saved at each evaluation; fit(resume=True) continues
    progress: bool = True  # tqdm.auto progress bar
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "mps"

    def __post_init__(self) -> None:
        utils.positive_int(max_steps=self.max_steps, eval_every=self.eval_every)
        utils.positive_float(lr=self.lr)
        utils.non_negative_int(warmup_steps=self.warmup_steps)
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})"
            )
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if (
            betas is None
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        utils.one_of("schedule", self.schedule, SCHEDULES)
        utils.fraction(min_lr_ratio=self.min_lr_ratio)
        if self.grad_clip is not None:
            utils.positive_float(grad_clip=self.grad_clip)
        if self.patience is not None:
            utils.positive_int(patience=self.patience)
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a non-empty string, got {self.metric!r}")
        utils.one_of("mode", self.mode, MODES)
        utils.one_of("precision", self.precision, PRECISIONS)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Taught in notebooks/08_fine_tuning.
    """

    history: list[dict[str, float]] = field(default_factory=list)  # a row per step
    best_metric: float | None = None  # best value of config.metric seen at an evaluation
    best_step: int | None = None  # the step where it was seen
    stopped_early: bool = False  # True when patience ran out before max_steps
    steps: int = 0  # optimiser steps actually taken (in this run and any resumed one)
    seconds: float = 0.0  # wall time of the loop, evaluations included (this call only)

    def evaluations(self) -> list[dict[str, float]]:
        """The rows of ``history`` that carry evaluation metrics."""
        return [row for row in self.history if row.get("evaluated")]


# --- the schedule ------------------------------------------------------------------------


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier in [0, 1] for the optimiser step with index ``step``.

    The same convention as ``transformers.get_cosine_schedule_with_warmup`` (``step`` counts
    from 0, the value the ``LambdaLR`` passes):

    - warm-up, ``step < W``: ``step / W``;
    - then, with progress ``p = (step - W) / (T - W)`` in [0, 1] and floor ``r``:
      cosine ``r + (1 - r) * (1 + cos(pi p)) / 2``, linear ``r + (1 - r) * (1 - p)``,
      constant ``1``.

    Args:
        step: a non-negative integer (values past ``max_steps`` give the final value).
        config: the :class:`TrainConfig` with ``max_steps``, ``warmup_steps``,
            ``schedule`` and ``min_lr_ratio``.

    Returns:
        The multiplier; the learning rate is ``config.lr * lr_at(step, config)``.

    Taught in notebooks/08_fine_tuning.
    """
    utils.non_negative_int(step=step)
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio
    if step < warmup:
        return step / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that multiplies each group's lr by :func:`lr_at` (call it after each step).

    Taught in notebooks/08_fine_tuning.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, config))


# --- AdamW, written out -------------------------------------------------------------------


def adamw_step(
    theta: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    t: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW update written out (003 §4.1, with the decay decoupled as in Loshchilov & Hutter).

    1) theta <- theta - lr * lambda * theta            (decoupled weight decay)
    2) m <- beta1 m + (1 - beta1) g                     (first moment)
    3) v <- beta2 v + (1 - beta2) g^2                   (second moment)
    4) m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)   (bias correction)
    5) theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

    Args:
        theta: the parameter, any shape.
        grad: its gradient g, same shape.
        m, v: the moment estimates from the previous step (zeros before the first).
        t: the step number, starting at 1.
        lr: the learning rate eta.
        betas: (beta1, beta2).
        eps: added to sqrt(v_hat).
        weight_decay: lambda (0 for biases and norm weights).

    Returns:
        ``(theta, m, v)`` after the step (new tensors; the inputs are not changed).

    Taught in notebooks/08_fine_tuning.
    """
    if grad.shape != theta.shape or m.shape != theta.shape or v.shape != theta.shape:
        raise ValueError(
            f"theta, grad, m and v must have the same shape, got {tuple(theta.shape)}, "
            f"{tuple(grad.shape)}, {tuple(m.shape)}, {tuple(v.shape)}"
        )
    utils.positive_int(t=t)
    beta1, beta2 = betas
    theta = theta * (1.0 - lr * weight_decay)  # 1)
    m = beta1 * m + (1.0 - beta1) * grad  # 2)
    v = beta2 * v + (1.0 - beta2) * grad * grad  # 3)
    m_hat = m / (1.0 - beta1**t)  # 4)
    v_hat = v / (1.0 - beta2**t)
    theta = theta - lr * m_hat / (v_hat.sqrt() + eps)  # 5)
    return theta, m, v


# --- the loop -----------------------------------------------------------------------------


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) dict / list / tuple to ``device``; other values stay.

    Taught in notebooks/08_fine_tuning.
    """
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class ShuffledBatches:
    """Mini-batches of rows of tensors that share their first axis, ready for :func:`fit`.

    Each epoch is a fresh permutation drawn from a generator seeded with ``seed``; the last,
    incomplete batch of an epoch is dropped, so every step sees ``batch_size`` rows. Batches
    are made when iterated (nothing is copied up front), and iterating again gives the same
    batches in the same order, so a run is reproducible and ``fit(resume=True)`` sees what
    the first run saw.

    Args:
        *tensors: one or more tensors with the same first dimension N (inputs, labels, ...).
        batch_size: rows per batch, at most N.
        num_batches: batches in one pass; ``None``: one epoch (``N // batch_size``). More
            than an epoch continues with the next epoch's permutation.
        seed: seed of the permutations.

    Yields:
        Tuples ``(tensors[0][idx], tensors[1][idx], ...)``.

    Taught in notebooks/04_transformer_encoders (first used) and 08_fine_tuning.
    """

    def __init__(
        self, *tensors: Tensor, batch_size: int, num_batches: int | None = None, seed: int = 0
    ) -> None:
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise ValueError("ShuffledBatches needs one or more tensors")
        n = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
        if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"the tensors must share their first dimension, got shapes {shapes}")
        utils.positive_int(batch_size=batch_size)
        if batch_size > n:
            raise ValueError(f"batch_size ({batch_size}) exceeds the {n} rows")
        if num_batches is not None:
            utils.positive_int(num_batches=num_batches)
        utils.non_negative_int(seed=seed)
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.num_batches = n // batch_size if num_batches is None else num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n, b = self.tensors[0].shape[0], self.batch_size
        generator = torch.Generator().manual_seed(self.seed)
        made = 0
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - b + 1, b):
                idx = order[start : start + b]
                yield tuple(t[idx] for t in self.tensors)
                made += 1
                if made == self.num_batches:
                    return


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked for ("auto": on CUDA only), else nothing."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _cycle(batches: Iterable) -> Iterator:
    """Iterate ``batches`` again and again (a DataLoader reshuffles at each pass)."""
    first_pass = None  # batches in the first pass
    while True:
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if first_pass is None:
            first_pass = count
        if count == 0 and first_pass == 0:
            raise ValueError("train_batches is empty: fit needs at least one batch")
        if count == 0:
            raise ValueError(
                f"train_batches was exhausted after {first_pass} batches: it is a one-shot "
                f"iterable ({type(batches).__name__}), and fit goes through the batches again "
                "until max_steps. Pass a list of batches or a re-iterable such as a DataLoader"
            )


def _better(value: float, best: float | None, mode: str) -> bool:
    """True if ``value`` improves on ``best``; a NaN is never better."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "step",
    "history",
    "best_metric",
    "best_step",
    "best_state",
    "bad_evaluations",
    "rng",
)


def _save_checkpoint(state: dict[str, Any], path: str) -> None:
    """torch.save through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _load_checkpoint(path: str, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` with ``weights_only=True`` (no code runs)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain Python "
            "values, which torch.load(weights_only=True) does not unpickle (a checkpoint "
            "written by fit never does; a crafted one could run code when loaded). "
            f"torch says: {reason}"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint written by fit: it lacks {missing}")
    return ckpt


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    model: nn.Module,
    train_batches: Iterable,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    config: TrainConfig,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    resume: bool = False,
    log_fn: Callable[[nn.Module], dict[str, float]] | None = None,
) -> FitResult:
    """Train ``model`` for ``config.max_steps`` optimiser steps (fewer if it stops early).

    Args:
        model: the model; moved to ``config.device``. Only parameters with
            ``requires_grad`` are optimised (freeze with :mod:`mmcourse.finetune` first).
        train_batches: a re-iterable (a DataLoader or a list of batches), cycled until
            ``max_steps``.
        loss_fn: ``(model, batch on the device) -> scalar loss``, or a dict whose ``"loss"``
            is minimised and whose other scalars (e.g. each objective's part) are recorded
            in the step's history row.
        config: the :class:`TrainConfig`.
        evaluate_fn: ``model -> {name: value}``, called in eval mode under ``no_grad``
            every ``eval_every`` steps and at the last step; ``config.metric`` is monitored
            for early stopping and best-weight restore.
        optimizer: default ``AdamW(finetune.param_groups(model, config.weight_decay))``
            with ``config.lr`` and ``config.betas``. Its lr is the peak lr; the schedule
            scales it.
        resume: continue from ``config.checkpoint_path`` if that file exists (same config,
            same ``train_batches`` in the same order). The file is read with
            ``torch.load(weights_only=True)``; one holding other objects is refused.
        log_fn: ``model -> {name: value}``, called after every optimiser step; the values
            join that step's history row (e.g. a learned temperature, ``logit_scale``).

    Under ``torch.distributed`` each row's ``loss`` is the mean over the processes (each
    holds its share of the global batch's loss), the same on every process.

    Returns:
        A :class:`FitResult`; the model is left in eval mode, on the device, holding the
        best evaluated weights when ``config.restore_best``.

    Raises:
        FloatingPointError: the loss or the monitored metric became NaN or infinite.
        ValueError: bad arguments, ``train_batches`` empty or exhausted (a one-shot
            iterator that runs out before ``max_steps``), or a checkpoint that is not one
            ``fit`` wrote.

    Taught in notebooks/08_fine_tuning.
    """
    from mmcourse.finetune import param_groups  # finetune does not import train

    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and config.checkpoint_path is None:
        raise ValueError("resume=True needs config.checkpoint_path")
    device = utils.get_device(config.device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU each
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad=False everywhere)")
    if optimizer is None:
        optimizer = torch.optim.AdamW(
            param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
        )
    scheduler = make_scheduler(optimizer, config)

    result = FitResult()
    best_state: dict[str, Tensor] | None = None
    bad_evaluations = 0
    start = 0
    if resume and os.path.exists(config.checkpoint_path):
        ckpt = _load_checkpoint(config.checkpoint_path, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        result.history = ckpt["history"]
        result.best_metric, result.best_step = ckpt["best_metric"], ckpt["best_step"]
        best_state, bad_evaluations = ckpt["best_state"], ckpt["bad_evaluations"]
        logger.info("resumed from %s at step %d", config.checkpoint_path, start)
    elif resume:
        logger.info("no checkpoint at %s yet: starting from step 0", config.checkpoint_path)

    batches = _cycle(train_batches)
    for _ in range(start):  # the same batches, in the same order, as the first run
        next(batches)
    if resume and start > 0:
        _set_rng_state(ckpt["rng"])  # dropout continues as if never interrupted

    from tqdm.auto import tqdm

    bar = tqdm(total=config.max_steps, initial=start, disable=not config.progress, leave=False)
    began = time.perf_counter()
    model.train()
    step = start
    while step < config.max_steps:
        batch = to_device(next(batches), device)
        lr = optimizer.param_groups[0]["lr"]
        with _autocast(config.precision, device):
            loss = loss_fn(model, batch)
        parts: dict[str, float] = {}
        if isinstance(loss, dict):  # {"loss": the total, other parts to record}
            if "loss" not in loss:
                raise ValueError(f"loss_fn returned a dict without 'loss': {sorted(loss)}")
            parts = {k: float(v) for k, v in loss.items() if k != "loss"}
            loss = loss["loss"]
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        logged = loss.detach()
        if distributed:  # every process's share of the global batch, averaged
            logged = logged.float().clone()
            torch.distributed.all_reduce(logged)
            logged /= torch.distributed.get_world_size()
        row = {"step": step, "loss": logged.item(), "lr": lr, "grad_norm": float(grad_norm)}
        row.update(parts)
        if log_fn is not None:
            row.update({k: float(v) for k, v in log_fn(model).items()})
        result.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")

        if step % config.eval_every == 0 or step == config.max_steps:
            if evaluate_fn is not None:
                model.eval()
                with torch.no_grad(), _autocast(config.precision, device):
                    metrics = evaluate_fn(model)
                model.train()
                if config.metric not in metrics:
                    raise ValueError(
                        f"evaluate_fn returned {sorted(metrics)}, without config.metric "
                        f"{config.metric!r}"
                    )
                row.update({k: float(v) for k, v in metrics.items()}, evaluated=True)
                value = float(metrics[config.metric])
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"evaluate_fn returned {config.metric} = {value} at step {step}: a "
                        "non-finite metric cannot be compared (the model or the evaluation "
                        "diverged)"
                    )
                if _better(value, result.best_metric, config.mode):
                    result.best_metric, result.best_step = value, step
                    best_state, bad_evaluations = _state_copy(model), 0
                else:
                    bad_evaluations += 1
                    if config.patience is not None and bad_evaluations >= config.patience:
                        # patience ran out; at the last step that is no *early* stop
                        result.stopped_early = step < config.max_steps
            if config.checkpoint_path is not None and rank == 0:  # one writer per run
                _save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                        "history": copy.deepcopy(result.history),
                        "best_metric": result.best_metric,
                        "best_step": result.best_step,
                        "best_state": best_state,
                        "bad_evaluations": bad_evaluations,
                        "rng": _rng_state(),
                    },
                    config.checkpoint_path,
                )
            if result.stopped_early:
                logger.info("early stop at step %d (best at %s)", step, result.best_step)
                break
    bar.close()
    result.seconds = time.perf_counter() - began
    result.steps = step
    if config.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def _rows(inputs: Any) -> int:
    """Number of examples in ``inputs`` (a tensor, a list/tuple or a dict of tensors)."""
    parts = list(inputs.values()) if isinstance(inputs, dict) else inputs
    if isinstance(parts, Tensor):
        parts = [parts]
    if (
        not isinstance(parts, (list, tuple))
        or not parts
        or not all(isinstance(x, Tensor) for x in parts)
    ):
        raise ValueError(
            "expected inputs as a tensor (N, ...), a non-empty list of tensors or a dict "
            f"{{name: tensor}}, got {type(inputs).__name__}"
        )
    sizes = {tuple(x.shape[:1]) for x in parts}
    if len(sizes) != 1 or parts[0].dim() == 0:
        raise ValueError(
            f"every input needs the same first (example) axis, got shapes {[tuple(x.shape) for x in parts]}"
        )
    return parts[0].shape[0]


def _slice(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict):
        return {k: v[start:stop] for k, v in inputs.items()}
    return [x[start:stop] for x in inputs]


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: Tensor | list[Tensor] | tuple[Tensor, ...] | dict[str, Tensor],
    *,
    batch_size: int = 512,
    train_mode: bool = False,
    **kwargs: Any,
) -> Tensor:
    """The course's one batched, no-grad evaluation: ``model``'s outputs on every example.

    The model runs in eval mode (``train_mode=True`` only to show the pitfall of evaluating
    with dropout and BatchNorm's batch statistics), one slice of ``batch_size`` examples at a
    time on the model's device; its mode is restored afterwards.

    Args:
        model: called as ``model(batch, **kwargs)``.
        inputs: a tensor (N, ...); a list/tuple of tensors (N, ...), passed to the model as a
            list; or a dict ``{name: (N, ...)}``, passed as a dict.
        batch_size: examples per forward pass.
        train_mode: evaluate in training mode instead of eval mode.
        **kwargs: passed to the model; those that are ``None`` are left out.

    Returns:
        The (N, ...) outputs, concatenated on the CPU.

    Taught in notebooks/05_fusion_strategies.
    """
    utils.positive_int(batch_size=batch_size)
    n = _rows(inputs)
    if isinstance(inputs, tuple):
        inputs = list(inputs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    was_training = model.training
    model.train(train_mode)
    device = next(model.parameters()).device
    try:
        outputs = [
            model(to_device(_slice(inputs, i, i + batch_size), device), **kwargs).cpu()
            for i in range(0, n, batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def accuracy(
    model: nn.Module,
    inputs: Tensor | list[Tensor] | tuple[Tensor, ...] | dict[str, Tensor],
    labels: Tensor,
    *,
    batch_size: int = 512,
    train_mode: bool = False,
    **kwargs: Any,
) -> float:
    """Top-1 accuracy of ``model`` on ``inputs``: the course's one ``accuracy``.

    Args:
        model, inputs, batch_size, train_mode, kwargs: as in :func:`predict`.
        labels: (N,) class indices.

    Returns:
        The fraction of examples whose argmax class equals the label, in [0, 1].

    Taught in notebooks/05_fusion_strategies.
    """
    n = _rows(inputs)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"expected labels of shape ({n},), one per example, got {tuple(labels.shape)}"
        )
    logits = predict(model, inputs, batch_size=batch_size, train_mode=train_mode, **kwargs)
    return (logits.argmax(-1) == labels.cpu()).float().mean().item()


__all__ = [
    "TrainConfig",
    "FitResult",
    "lr_at",
    "make_scheduler",
    "adamw_step",
    "to_device",
    "ShuffledBatches",
    "fit",
    "predict",
    "accuracy",
]
