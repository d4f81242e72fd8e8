"""Data parallelism for CLIP: the same training on W processes, the negatives gathered across them.

**Data parallelism** (数据并行): W processes (one per GPU; here one per CPU core) each hold a
full replica of the model and compute on their own slice of the global batch, G = W * B
pairs. ``DistributedDataParallel`` (DDP) averages the gradients over the processes
(an all-reduce) during ``backward``, so every replica takes the same optimiser step. For a
loss that is a mean over examples this is exactly the single-process step on the global
batch. The CLIP loss is not: each image's softmax runs over *every* text of the batch, so
each process first gathers the embeddings of all processes (``mmcourse.contrastive``:
``ClipLoss(world_size=W, rank=r, local_loss=True, gather_with_grad=True)``) and scores its
B rows against all G columns, the targets offset by ``rank * B``.

Launch with ``torchrun``, which starts the W processes and gives each ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment::

    torchrun --nproc_per_node 2 -m mmcourse.distributed --steps 20 --batch-size 64 \\
        --out result.json [--save-weights weights.pt]
    python -m mmcourse.distributed --steps 20 --batch-size 64 --out result.json  # W = 1

Both commands train the same tiny CLIP on the same global batches from the same initial
weights; ``result.json`` holds the per-step losses and a checksum of the final weights, and
the two runs agree to float precision. Options (``--help`` lists them all): ``--lr``,
``--seed``, ``--num-pairs``, ``--width``, ``--layers``, ``--heads``, ``--loss clip|siglip``,
``--[no-]local-loss``, ``--[no-]gather-with-grad``, ``--device auto|cpu|cuda``,
``--precision auto|fp32|bf16``, ``--threads``. On CPUs the processes talk
over ``gloo``; on GPUs over ``nccl``, one GPU per process (``cuda:LOCAL_RANK``).

The module reads top to bottom like chapter 15:

1. ``read_torchrun_env`` / ``init_distributed`` / ``cleanup_distributed``: a process group
   from torchrun's environment (or none, for one process);
2. ``global_batch_indices`` / ``split_global_batch``: the same global batches on every
   process, each taking its contiguous slice;
3. ``LocalBatches``: this process's slices, for ``mmcourse.train.fit`` - the course's one
   training loop, run on every process with the model wrapped in DDP (which all-reduces
   the gradients, the model's logit scale included) and ``contrastive.PairObjective``;
4. ``distributed_siglip_loss`` / ``DistributedSigLipLoss``: SigLIP over gathered texts;
5. ``ScalingConfig`` / ``run_clip_training`` / ``main``: the command line.

Axis letters: B local batch, G = W * B global batch, W world size (processes), D width,
E shared embedding width, N pairs in the data set, L caption tokens.

Taught in notebooks/15_scaling_out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.clip import TinyClip, TinyClipConfig, WordTokenizer, record_logit_scale
from mmcourse.contrastive import (
    ClipLoss,
    PairObjective,
    SigLipLoss,
    gather_features,
    siglip_loss,
)
from mmcourse.train import ShuffledBatches, TrainConfig, fit
from mmcourse.utils import get_device, non_negative_int, one_of, positive_float, positive_int

logger = logging.getLogger(__name__)

# --- 1. a process group from torchrun's environment ---------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the W processes of a run.

    Taught in notebooks/15_scaling_out.
    """

    rank: int = 0  # r: this process's place among all processes, 0..W-1
    local_rank: int = 0  # its place on this machine (picks its GPU), 0..nproc_per_node-1
    world_size: int = 1  # W: the number of processes
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # its device
    backend: str | None = None  # "gloo" (CPU), "nccl" (CUDA), None: one process, no group

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and saves."""
        return self.rank == 0


def read_torchrun_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's variables; ``(0, 0, 1)`` without them.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``(RANK, LOCAL_RANK, WORLD_SIZE)`` as ints.
    """
    env = os.environ if env is None else env
    values = {}
    for name, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        raw = env.get(name, default)
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(
                f"environment variable {name} must be an integer, got {raw!r}"
            ) from None
    rank, local_rank, world_size = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, "
            f"LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}"
        )
    return rank, local_rank, world_size


def init_distributed(device: str | torch.device = "auto") -> DistributedContext:
    """Join the process group that torchrun set up (or stay alone when started without it).

    One device per process: on CUDA, GPU ``LOCAL_RANK`` and the ``nccl`` backend; on a CPU,
    the ``gloo`` backend. With ``WORLD_SIZE`` unset or 1 no group is created and the code
    that follows runs as a plain single-process program.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`DistributedContext` of this process.
    """
    rank, local_rank, world_size = read_torchrun_env()
    device = get_device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but only "
                f"{torch.cuda.device_count()} are visible; start at most that many processes "
                "per machine (--nproc_per_node) or use --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(device=device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"distributed training needs device cpu (gloo) or cuda (nccl), got {device}"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set: launch with "
            "`torchrun --nproc_per_node W -m ...`, which sets them"
        )
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        device_id=device if device.type == "cuda" else None,
    )
    logger.info("rank %d/%d joined the %s group on %s", rank, world_size, backend, device)
    return DistributedContext(rank, local_rank, world_size, device, backend)


def cleanup_distributed(context: DistributedContext) -> None:
    """Wait for every process, then leave the group (nothing to do for one process)."""
    import torch.distributed as dist

    if context.backend is not None and dist.is_initialized():
        dist.barrier()  # nobody tears the group down while another still talks
        dist.destroy_process_group()


# --- 2. the same global batches everywhere, one slice each -------------------------------


def global_batch_indices(
    num_pairs: int, batch_size: int, steps: int, *, seed: int
) -> Iterator[Tensor]:
    """Yield the G pair indices of each step's global batch, the same on every process.

    The order of :class:`mmcourse.train.ShuffledBatches` (and so of chapter 06's
    ``PairBatches``): a fresh permutation of the N pairs per epoch (from a generator seeded
    with ``seed``), cut into consecutive batches, the tail dropped.
    Every process draws the identical sequence because it uses the same seed; what differs
    is only the slice it keeps (:func:`split_global_batch`).

    Args:
        num_pairs: N, the size of the data set.
        batch_size: G, the global batch.
        steps: how many batches to yield.
        seed: the seed of the permutations (the same on every process!).

    Yields:
        (G,) int64 indices into the data set.
    """
    positive_int(num_pairs=num_pairs, batch_size=batch_size, steps=steps)
    non_negative_int(seed=seed)
    if batch_size > num_pairs:
        raise ValueError(f"batch_size={batch_size} is larger than the {num_pairs} pairs")
    pairs = torch.arange(num_pairs)
    for (index,) in ShuffledBatches(pairs, batch_size=batch_size, num_batches=steps, seed=seed):
        yield index


def split_global_batch(index: Tensor, *, rank: int, world_size: int) -> Tensor:
    """Rank r's contiguous slice of a global batch: rows ``r * B : (r + 1) * B``, B = G / W.

    Contiguous, so that after the all-gather (which concatenates in rank order) pair i of
    rank r sits at position ``r * B + i`` of the global batch - the target of its row.
    ``DistributedSampler`` strides instead (``index[r::W]``); that is fine too as long as
    images and texts are split alike, since the gathered batch is then only reordered.

    Args:
        index: (G,) the global batch (any tensor whose first axis is the batch).
        rank: r, 0 <= r < W.
        world_size: W; it must divide G.

    Returns:
        (B,) rows of ``index``.
    """
    positive_int(world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    G = index.shape[0]
    if G % world_size:
        raise ValueError(
            f"the global batch of {G} pairs does not split into {world_size} equal local "
            "batches; choose a batch_size divisible by the number of processes"
        )
    B = G // world_size
    return index[rank * B : (rank + 1) * B]


# --- 3. the DDP training loop ------------------------------------------------------------


class LocalBatches:
    """This process's slices of the global batches, ready for :func:`mmcourse.train.fit`.

    Every process iterates the same global batches (:func:`global_batch_indices`) and keeps
    its contiguous slice (:func:`split_global_batch`); captions keep their full padded
    width, so that every process and the one-process reference see tensors of one shape.
    Re-iterable: each pass yields the same batches.

    Args:
        images: (N, 3, S, S) all the images (each process holds its own copy).
        text: the N captions: the tokenizer's dict of (N, L) tensors, or (N, F) features.
        batch_size: G, the global batch; W must divide it.
        num_batches: batches per pass (``fit`` takes ``max_steps`` of them).
        seed: the permutations' seed, the same on every process.
        rank: this process's rank r.
        world_size: W.

    Yields:
        ``(images (B, ...), text (B, ...))`` with B = G / W.

    Taught in notebooks/15_scaling_out.
    """

    def __init__(
        self,
        images: Tensor,
        text: dict[str, Tensor] | Tensor,
        *,
        batch_size: int,
        num_batches: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n = len(images)
        num_texts = len(text) if isinstance(text, Tensor) else len(text["input_ids"])
        if num_texts != n:
            raise ValueError(f"need one caption per image, got {n} images and {num_texts} texts")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} (the global batch G) must be divisible by the "
                f"world size W={world_size}"
            )
        self.images, self.text = images, text
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        self.rank, self.world_size = rank, world_size
        global_batch_indices(n, batch_size, num_batches, seed=seed)  # checks the arguments

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor] | Tensor]]:
        batches = global_batch_indices(
            len(self.images), self.batch_size, self.num_batches, seed=self.seed
        )
        for global_index in batches:
            local = split_global_batch(global_index, rank=self.rank, world_size=self.world_size)
            yield self.images[local], _rows(self.text, local)


def _rows(text: dict[str, Tensor] | Tensor, index: Tensor) -> dict[str, Tensor] | Tensor:
    """Rows ``index`` of a tokenizer dict or a feature tensor (padding kept: same width everywhere)."""
    if isinstance(text, Tensor):
        return text[index]
    return {key: value[index] for key, value in text.items()}


def weights_checksum(module: nn.Module) -> dict[str, Any]:
    """A fingerprint of a module's parameters and buffers (in ``state_dict`` order).

    Returns:
        ``{"sum": float, "abs_sum": float, "sha256": str}``: the float64 sums tell two runs
        apart to float precision; the SHA-256 of the float32 bytes is equal only for bitwise
        identical weights (a rerun of the same command on the same machine).
    """
    digest = hashlib.sha256()
    total = absolute = 0.0
    for tensor in module.state_dict().values():
        t = tensor.detach().float().cpu().contiguous()
        total += t.double().sum().item()
        absolute += t.double().abs().sum().item()
        digest.update(t.numpy().tobytes())
    return {"sum": total, "abs_sum": absolute, "sha256": digest.hexdigest()}


# --- 4. SigLIP across processes ----------------------------------------------------------


def distributed_siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    rank: int,
    world_size: int,
) -> Tensor:
    """The SigLIP loss of the global batch, each process scoring its B images against all G texts.

    With z_ij = +1 for a matching pair and -1 otherwise, process r computes
    ``L_r = -(1/B) sum_{i in r} sum_j log sigmoid(z_ij (s x_i . y_j + b))`` over its rows;
    the positives sit at columns ``r * B + i``. The mean of the W losses is the
    single-process ``siglip_loss`` on the global batch. The texts are gathered with
    gradient, so that the gradient of a text from every process's rows comes back to the
    process that owns it. (The SigLIP paper avoids even this (B, G) block: the text chunks
    travel around a ring of processes, W steps of (B, B) each.)

    Args:
        image_embeds: (B, D) this process's image embeddings.
        text_embeds: (B, D) this process's text embeddings.
        logit_scale: s, already exponentiated.
        logit_bias: b.
        rank: this process's rank.
        world_size: W.

    Returns:
        The scalar loss of this process.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    # the images are gathered too but not used: SigLIP's rows are independent
    _, all_text = gather_features(
        image_embeds, text_embeds, gather_with_grad=True, rank=rank, world_size=world_size
    )  # (G, D)
    B = image_embeds.shape[0]
    logits = logit_scale * image_embeds @ all_text.T + logit_bias  # (B, G)
    labels = -torch.ones_like(logits)  # (B, G): z_ij = -1 ...
    rows = torch.arange(B, device=logits.device)
    labels[rows, rows + rank * B] = 1.0  # ... except the B positives, offset by rank
    return -F.logsigmoid(labels * logits).sum(-1).mean()


class DistributedSigLipLoss(SigLipLoss):
    """``SigLipLoss`` that gathers the texts when W > 1: ``loss(u, v, logit_scale, logit_bias)``.

    Args:
        rank: this process's rank.
        world_size: W (1: the plain ``siglip_loss``).
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, {world_size=}")
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
    ) -> Tensor:
        """Args: (B, D) local batches, s and b. Returns: this process's scalar loss."""
        if self.world_size == 1:
            return siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias)
        return distributed_siglip_loss(
            image_embeds,
            text_embeds,
            logit_scale,
            logit_bias,
            rank=self.rank,
            world_size=self.world_size,
        )


# --- 5. the command line -----------------------------------------------------------------


@dataclass
class ScalingConfig:
    """One run of ``python -m mmcourse.distributed`` (the same on every process).

    Taught in notebooks/15_scaling_out.
    """

    steps: int = 60  # optimiser steps
    batch_size: int = 64  # G: the global batch, split into W local batches of G / W
    num_pairs: int = 1024  # N: Shapes-world training pairs, generated alike by every process
    lr: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 20  # linear warm-up steps, then cosine to 0
    seed: int = 0  # data, initial weights and batch order: the SAME on every process
    embed_dim: int = 32  # E: shared embedding width
    width: int = 32  # D: width of both towers
    layers: int = 1  # blocks of each tower
    heads: int = 2  # attention heads of each tower
    loss: str = "clip"  # "clip" (ClipLoss) or "siglip" (DistributedSigLipLoss)
    local_loss: bool = True  # CLIP: each process scores B rows x G columns, not G x G
    gather_with_grad: bool = True  # CLIP: gradients flow back through the all-gather
    device: str = "auto"  # "auto": cuda:LOCAL_RANK with nccl when CUDA is there, else cpu/gloo
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; "fp32"; "bf16"
    threads: int = 0  # torch threads per process (0: leave torch's / torchrun's default)

    def __post_init__(self) -> None:
        positive_int(steps=self.steps, batch_size=self.batch_size, num_pairs=self.num_pairs)
        positive_int(embed_dim=self.embed_dim, width=self.width, layers=self.layers)
        positive_int(heads=self.heads)
        non_negative_int(warmup_steps=self.warmup_steps, seed=self.seed, threads=self.threads)
        positive_float(lr=self.lr)
        one_of("loss", self.loss, ("clip", "siglip"))
        one_of("precision", self.precision, ("auto", "fp32", "bf16"))
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}")
        if self.batch_size > self.num_pairs:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than num_pairs={self.num_pairs}"
            )


def build_data(config: ScalingConfig) -> tuple[Tensor, dict[str, Tensor], WordTokenizer]:
    """The Shapes-world pairs (one object per scene) and their tokenized captions.

    Deterministic from ``config.seed``: every process builds the identical data set, so
    nothing has to be sent around; each keeps only its slice of each batch.

    Returns:
        ``(images (N, 3, 32, 32), text {"input_ids", "attention_mask"} (N, L), tokenizer)``.
    """
    from mmcourse.data.shapes import ShapesConfig, shapes_tensors

    data = shapes_tensors(
        config.num_pairs, split="train", config=ShapesConfig(max_objects=1, seed=config.seed)
    )
    tokenizer = WordTokenizer.from_texts(data["caption"])
    return data["images"], tokenizer(data["caption"]), tokenizer


def build_model(config: ScalingConfig, vocab_size: int, *, seed: int) -> TinyClip:
    """The tiny CLIP of ``config``, initialised from ``seed`` (call it alike on every process)."""
    torch.manual_seed(seed)
    return TinyClip(
        TinyClipConfig(
            embed_dim=config.embed_dim,
            vision_dim=config.width,
            vision_layers=config.layers,
            vision_heads=config.heads,
            vocab_size=vocab_size,
            text_dim=config.width,
            text_layers=config.layers,
            text_heads=config.heads,
            # SigLIP's initial s = 10 and b = -10; CLIP's s = 1 / 0.07 and no bias
            logit_scale_init=10.0 if config.loss == "siglip" else 1 / 0.07,
            logit_bias_init=-10.0 if config.loss == "siglip" else None,
        )
    )


def run_clip_training(
    config: ScalingConfig,
    context: DistributedContext | None = None,
    *,
    out: str | Path | None = None,
    save_weights: str | Path | None = None,
) -> dict[str, Any]:
    """Build the data and the model, train, and (rank 0) write the results.

    Args:
        config: the run.
        context: this process's :class:`DistributedContext` (default: one process on
            ``config.device``).
        out: a JSON file for the results (written by rank 0 only).
        save_weights: a ``torch.save`` file for the model's final ``state_dict``, its
            logit scale included (rank 0 only; every process holds the same weights).

    Returns:
        A dict: ``world_size``, ``batch_size`` (G), ``local_batch_size`` (B), ``losses``,
        ``logit_scale``, ``checksum`` (:func:`weights_checksum`), ``seconds``,
        ``images_per_second``, ``device``, ``backend`` and ``config``.
    """
    if context is None:
        context = DistributedContext(device=get_device(config.device))
    W = context.world_size
    if config.batch_size % W:
        raise ValueError(
            f"batch_size={config.batch_size} (the global batch) must be divisible by the "
            f"{W} processes"
        )
    if config.threads and context.device.type == "cpu":
        torch.set_num_threads(config.threads)
    images, text, tokenizer = build_data(config)
    model = build_model(config, len(tokenizer), seed=config.seed)
    if config.loss == "clip":
        if config.local_loss and not config.gather_with_grad and W > 1:
            logger.warning(
                "local_loss without gather_with_grad: the gradients of this process's "
                "embeddings from the other processes' rows are lost - training differs"
            )
        if not config.local_loss and not config.gather_with_grad and W > 1:
            logger.warning(
                "full (G, G) loss without gather_with_grad (open_clip's default): the towers' "
                "gradients are 1/W of the single-process ones after DDP's average - Adam's "
                "step is nearly unchanged, but gradient clipping and SGD are not"
            )
        loss_fn: nn.Module = ClipLoss(
            local_loss=config.local_loss,
            gather_with_grad=config.gather_with_grad,
            rank=context.rank,
            world_size=W,
        )
    else:
        loss_fn = DistributedSigLipLoss(rank=context.rank, world_size=W)
    model.to(context.device)
    if W > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [context.device.index] if context.device.type == "cuda" else None
        trainer: nn.Module = DDP(model, device_ids=ids)  # all-reduces the gradients
    else:
        trainer = model
    batches = LocalBatches(
        images,
        text,
        batch_size=config.batch_size,
        num_batches=config.steps,
        seed=config.seed,
        rank=context.rank,
        world_size=W,
    )
    train_config = TrainConfig(  # chapter 06's recipe: clip.clip_recipe
        max_steps=config.steps,
        lr=config.lr,
        weight_decay=0.05,
        warmup_steps=config.warmup_steps,
        eval_every=config.steps,
        precision=config.precision,
        device=str(context.device),
        progress=False,
    )
    fitted = fit(
        trainer,
        batches,
        loss_fn=PairObjective(loss_fn),
        config=train_config,
        log_fn=record_logit_scale,
    )
    result = {
        "world_size": W,
        "batch_size": config.batch_size,
        "local_batch_size": config.batch_size // W,
        "losses": [row["loss"] for row in fitted.history],
        "logit_scale": [row["logit_scale"] for row in fitted.history],
        "checksum": weights_checksum(model),
        "seconds": fitted.seconds,
        "images_per_second": config.steps * config.batch_size / fitted.seconds,
        "device": str(context.device),
        "backend": context.backend,
        "threads": torch.get_num_threads(),
        "config": asdict(config),
    }
    if context.is_main:
        if out is not None:
            Path(out).write_text(json.dumps(result, indent=1), encoding="utf-8")
        if save_weights is not None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save(state, save_weights)
        logger.info(
            "W=%d, G=%d (B=%d per process): final loss %.4f, %.0f images/s",
            W,
            config.batch_size,
            config.batch_size // W,
            result["losses"][-1],
            result["images_per_second"],
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m mmcourse.distributed`` (one per :class:`ScalingConfig` field)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmcourse.distributed",
        description="Train a tiny CLIP with data parallelism; run under torchrun for W > 1.",
        epilog="example: torchrun --nproc_per_node 2 -m mmcourse.distributed --steps 20 "
        "--batch-size 64 --out result.json",
    )
    defaults = ScalingConfig()
    parser.add_argument("--out", help="JSON file for the per-step losses and the checksum")
    parser.add_argument("--save-weights", help="torch.save file for the final weights (rank 0)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="G, the GLOBAL batch"
    )
    parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs, help="N pairs")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak lr")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the same on all ranks")
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim, help="E")
    parser.add_argument("--width", type=int, default=defaults.width, help="D of both towers")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="blocks per tower")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="heads per block")
    parser.add_argument("--loss", default=defaults.loss, choices=("clip", "siglip"))
    parser.add_argument(
        "--local-loss", action=argparse.BooleanOptionalAction, default=defaults.local_loss
    )
    parser.add_argument(
        "--gather-with-grad",
        action=argparse.BooleanOptionalAction,
        default=defaults.gather_with_grad,
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    parser.add_argument("--precision", default=defaults.precision, choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=defaults.threads, help="0: default")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options, join torchrun's group (if any), train, write ``--out``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("out", "save_weights")}
    try:
        config = ScalingConfig(**options)
        rank, _, world_size = read_torchrun_env()
        if config.batch_size % world_size:
            raise ValueError(
                f"--batch-size {config.batch_size} (the global batch) must be divisible by "
                f"the {world_size} processes"
            )
        for path in (args.out, args.save_weights):
            if path is not None and not Path(path).resolve().parent.is_dir():
                raise ValueError(f"the folder of {path!r} does not exist")
    except ValueError as err:
        parser.error(str(err))  # exits with status 2 on every process, before any group
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(message)s",
    )
    context = init_distributed(config.device)
    try:
        run_clip_training(config, context, out=args.out, save_weights=args.save_weights)
    finally:
        cleanup_distributed(context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
