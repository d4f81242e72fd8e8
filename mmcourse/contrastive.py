"""Contrastive alignment of two modalities: InfoNCE, the CLIP loss, SigLIP, zero-shot, retrieval.

Given B matching pairs, the embeddings are L2-normalised, every image is compared with every
text, and each row (and each column) of the B x B similarity matrix is a B-way
classification whose correct answer is the diagonal:

    logits = s * (u / |u|) (v / |v|)^T,   L = (CE(logits, I) + CE(logits^T, I)) / 2

where ``s = logit_scale`` is the (already exponentiated) inverse temperature, s = 1 / tau.

The module reads top to bottom like chapter 06:

1. ``info_nce``: one direction, the source's (004 §4.2.1) formula with the normalisation and
   the temperature made explicit;
2. ``clip_loss`` / ``ClipLoss``: the symmetric version, the logit scale s given by the model
   (``multi_positive_clip_loss``: the same with repeated captions counted as positives);
3. ``soft_target_clip_loss``: the source's (004 §4.2.2) ``CLIPLoss``, kept ONLY as the
   "Common pitfall" to show why it is wrong;
4. ``siglip_loss`` / ``SigLipLoss``: the sigmoid pairwise loss;
5. ``gather_features`` / ``distributed_clip_loss``: the same loss over a batch split across
   processes (as open_clip), separate from the single-device formula; ``PairObjective``:
   the loss of one batch of a model that owns its scale, for ``mmcourse.train.fit``;
6. ``zero_shot_classifier`` / ``zero_shot_predict`` and ``retrieval_metrics``: how a trained
   pair of towers is used and measured.

Axis letters: B batch (per process), G global batch (all processes), W world size, D
embedding width, C classes, T prompt templates, N_i images, N_t texts.

Taught in notebooks/06_contrastive_learning_and_clip; notebook 01 uses ``clip_loss`` for a
first shared space. ``LogitScale``, the learnable temperature a model owns, is chapter 01's
(``mmcourse.modalities``) and is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.modalities import LogitScale  # noqa: F401 (re-exported: chapter 06 imports it here)


def _check_embeddings(**named: Tensor) -> None:
    """Raise ValueError for an empty batch or non-finite values (checked by public functions)."""
    for name, x in named.items():
        if x.shape[0] == 0 or x.shape[-1] == 0:
            raise ValueError(
                f"{name} is an empty batch of shape {tuple(x.shape)}: need B >= 1, D >= 1"
            )
        if not torch.isfinite(x).all():
            raise ValueError(
                f"{name} holds non-finite values (NaN or inf); the encoder or its input diverged"
            )


def _check_positive(name: str, value: Tensor | float, *, zero_ok: bool = False) -> None:
    """Raise ValueError unless ``value`` (a number or a one-element tensor) is finite and > 0
    (>= 0 with ``zero_ok``)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a 0-d tensor, got shape {tuple(value.shape)}"
            )
        number = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {number}")


def _check_finite(name: str, value: Tensor | float) -> None:
    """Raise ValueError unless ``value`` (a number or a one-element tensor) is finite."""
    number = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")


def _check_pair(image_embeds: Tensor, text_embeds: Tensor) -> None:
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "expected two (B, D) embedding batches of the same shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    _check_embeddings(image_embeds=image_embeds, text_embeds=text_embeds)


# --- 1. InfoNCE: one direction ---------------------------------------------------------


def info_nce(
    query: Tensor, keys: Tensor, *, temperature: Tensor | float, targets: Tensor | None = None
) -> Tensor:
    """One-directional InfoNCE: each query must pick its own key among all keys.

    The source (004 §4.2.1) writes
    ``L = -E[log exp(f(x)^T g(y)) / sum_y' exp(f(x)^T g(y'))]``; here f(x) and g(y) are
    L2-normalised and the dot product is divided by a temperature tau, as CLIP/MoCo do:

        L = -(1/N) sum_n log softmax_m(q_n . k_m / tau)[target_n]

    Args:
        query: (N, D) query embeddings, e.g. images (need not be normalised).
        keys: (M, D) key embeddings, e.g. texts; M >= N when ``targets`` is None (the extra
            keys are extra negatives, as in a memory bank).
        temperature: tau > 0 (a float or a 0-d tensor); CLIP's initial value is 0.07.
        targets: (N,) index of the positive key of each query; default ``arange(N)``
            (query n matches key n).

    Returns:
        The scalar loss (mean over queries).
    """
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            "expected query (N, D) and keys (M, D) with the same D, got "
            f"{tuple(query.shape)} and {tuple(keys.shape)}"
        )
    _check_embeddings(query=query, keys=keys)
    _check_positive("temperature", temperature)
    if targets is None:
        if keys.shape[0] < query.shape[0]:
            raise ValueError(
                f"without targets, query n matches key n, so keys needs at least N="
                f"{query.shape[0]} rows, got {keys.shape[0]}"
            )
        targets = torch.arange(query.shape[0], device=query.device)
    elif targets.shape != (query.shape[0],):
        raise ValueError(
            f"expected targets of shape ({query.shape[0]},), got {tuple(targets.shape)}"
        )
    query = F.normalize(query, dim=-1)
    keys = F.normalize(keys, dim=-1)
    logits = query @ keys.T / temperature  # (N, M): q_n . k_m / tau
    return F.cross_entropy(logits, targets)


# --- 2. The CLIP loss: symmetric InfoNCE with a learned temperature --------------------


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric cross-entropy with identity targets over L2-normalised embeddings.

    Equal to ``(info_nce(u, v, temperature=1/s) + info_nce(v, u, temperature=1/s)) / 2``.

    Args:
        image_embeds: (B, D) embeddings of one modality (need not be normalised).
        text_embeds: (B, D) embeddings of the other; row i matches ``image_embeds`` row i.
        logit_scale: the multiplier s = 1 / temperature (already exponentiated, as in
            open_clip), a float or a 0-d tensor.

    Returns:
        The scalar loss.
    """
    _check_pair(image_embeds, text_embeds)
    _check_positive("logit_scale", logit_scale, zero_ok=True)  # s = 0: uniform logits
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * image_embeds @ text_embeds.T  # (B, B): image i vs text j
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def multi_positive_clip_loss(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float, labels: Tensor
) -> Tensor:
    """The CLIP loss with every pair of equal ``labels`` counted as a positive.

    The identity targets of ``clip_loss`` say that caption j is wrong for image i even when
    caption j == caption i (a *false negative*). Here the target of row i is spread evenly
    over the columns with ``labels[j] == labels[i]`` (the soft target of SupCon-style,
    label-aware contrastive losses), in both directions:

        q_ij = [y_i = y_j] / sum_k [y_i = y_k],   L = -(1/2B) sum_ij q_ij (log p_ij + log p'_ij)

    with p = softmax over the rows of ``s u v^T`` and p' over its columns. With all labels
    distinct it equals ``clip_loss``.

    Args:
        image_embeds: (B, D) image embeddings (need not be normalised).
        text_embeds: (B, D) text embeddings; row i matches ``image_embeds`` row i.
        logit_scale: s = 1 / tau, already exponentiated.
        labels: (B,) integer ids; equal ids mark interchangeable captions (e.g. the same text).

    Returns:
        The scalar loss.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    _check_pair(image_embeds, text_embeds)
    if labels.shape != (image_embeds.shape[0],):
        raise ValueError(
            f"expected labels of shape ({image_embeds.shape[0]},), got {tuple(labels.shape)}"
        )
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * image_embeds @ text_embeds.T  # (B, B)
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1)  # (B,)
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1)  # (B,)
    return (image_to_text.mean() + text_to_image.mean()) / 2


class ClipLoss(nn.Module):
    """The CLIP loss on one device or across processes; the model owns the logit scale.

    ``loss(u, v, logit_scale)`` is ``clip_loss(u, v, logit_scale)`` with ``world_size == 1``
    (the default, which never touches ``torch.distributed``), and
    ``multi_positive_clip_loss`` when each pair's ``labels`` are passed too. With
    ``world_size > 1`` each process passes its local (B, D) batch and the features are
    gathered first (see ``distributed_clip_loss``).

    Args:
        local_loss: distributed only; compute the loss for the local rows against all
            columns (O(B G) memory) instead of the full (G, G) matrix on every process.
        gather_with_grad: distributed only; let gradients flow back through the gather.
            Needed for exact gradients with ``local_loss=True``.
        rank: this process's rank.
        world_size: the number of processes.
    """

    def __init__(
        self,
        *,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, {world_size=}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Args: (B, D) local batches, s = 1 / tau, optional (B,) labels. Returns: the loss."""
        if labels is not None:
            if self.world_size > 1:
                raise ValueError("labels (the multi-positive loss) need world_size == 1")
            return multi_positive_clip_loss(image_embeds, text_embeds, logit_scale, labels)
        if self.world_size == 1:
            return clip_loss(image_embeds, text_embeds, logit_scale)
        return distributed_clip_loss(
            image_embeds,
            text_embeds,
            logit_scale,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )


# --- 3. Common pitfall: the source's soft-target "CLIPLoss" ----------------------------


def soft_target_clip_loss(
    image_embeds: Tensor, text_embeds: Tensor, temperature: float = 1.0
) -> Tensor:
    """The source's (004 §4.2.2) ``CLIPLoss``, reproduced faithfully. DO NOT TRAIN WITH IT.

    Kept ONLY to demonstrate why it is wrong (chapter 06's "Common pitfall" box). It
    differs from CLIP in three ways:

    * the targets are not the identity but ``softmax((u u^T + v v^T) / 2 * tau)``, built
      from the embeddings themselves (and not detached), so the model chooses its own
      answers: if every embedding is the same vector, targets and predictions are both
      uniform and the loss is log B;
    * the temperature is a fixed hyper-parameter, not a learned, clamped log-scale;
    * the logits are divided by tau while the target similarities are multiplied by it,
      so for any tau < 1 (CLIP's 0.07 included) the sharp predictions are scored against
      near-uniform targets and collapse gives a LOWER loss than perfectly aligned,
      distinct embeddings; at the source's default tau = 1 the loss barely tells them
      apart (at most log B - H(softmax(I)) nats, about 0.08 for B = 8), and gradient
      descent on free embeddings merges pairs (tests/test_contrastive.py shows both).

    Args:
        image_embeds: (B, D) image embeddings (need not be normalised).
        text_embeds: (B, D) text embeddings; row i matches ``image_embeds`` row i.
        temperature: the source's fixed ``temperature`` (default 1.0, as in the source).

    Returns:
        The scalar loss.
    """
    _check_pair(image_embeds, text_embeds)
    _check_positive("temperature", temperature)
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = image_embeds @ text_embeds.T / temperature  # (B, B)
    images_similarity = image_embeds @ image_embeds.T  # (B, B)
    texts_similarity = text_embeds @ text_embeds.T  # (B, B)
    targets = F.softmax((images_similarity + texts_similarity) / 2 * temperature, dim=-1)
    # the source's cross_entropy(preds, targets) = sum_j -targets_j * log_softmax(preds)_j
    texts_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)  # (B,)
    images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1)  # (B,)
    return ((images_loss + texts_loss) / 2.0).mean()


# --- 4. SigLIP: a sigmoid per pair instead of a softmax per row ------------------------


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
) -> Tensor:
    """The SigLIP loss: an independent binary classification for every (image, text) pair.

    Zhai et al. 2023, with z_ij = +1 if i == j else -1 and normalised x_i, y_j:

        L = -(1/B) sum_i sum_j log sigmoid(z_ij (s x_i . y_j + b))

    the normalisation of big_vision and of transformers' ``SiglipModel`` (sum over the
    pairs of a row, mean over rows); the sum over all pairs makes it symmetric.

    Args:
        image_embeds: (B, D) image embeddings (need not be normalised).
        text_embeds: (B, D) text embeddings; row i matches ``image_embeds`` row i.
        logit_scale: s (already exponentiated; the paper learns t' = log s, init log 10).
        logit_bias: b (the paper's init: -10, so that the many negatives start near 0 loss).

    Returns:
        The scalar loss.
    """
    _check_pair(image_embeds, text_embeds)
    _check_positive("logit_scale", logit_scale, zero_ok=True)  # s = 0: uniform logits
    _check_finite("logit_bias", logit_bias)
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * image_embeds @ text_embeds.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(-1).mean()


class SigLipLoss(nn.Module):
    """The SigLIP loss as a module: ``loss(u, v, logit_scale, logit_bias)``.

    The model owns the learned scale s (as a log; the paper's init 10) and bias b (init
    -10), as ``transformers``' ``SiglipModel`` does; see :class:`PairObjective`.
    """

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
    ) -> Tensor:
        """Args: image_embeds, text_embeds: (B, D); s and b. Returns: the scalar loss."""
        return siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias)


# --- 5. Distributed: gather the batch from every process, then the same loss -----------


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own slice.

    Forward: (B, D) on each of W processes -> (W * B, D), rank order. Backward: every
    process holds a (W * B, D) gradient; summing them (all_reduce) and keeping rows
    ``rank * B : (rank + 1) * B`` is a reduce-scatter. Written out rather than taken from
    ``torch.distributed.nn.functional.all_gather`` (deprecated in torch 2.13) so that the
    rule can be read; it is what that function computes.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, rank: int, world_size: int) -> Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.batch = rank, tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)  # (W * B, D)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        import torch.distributed as dist

        grad = grad_output.contiguous().clone()  # (W * B, D)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rows = slice(ctx.rank * ctx.batch, (ctx.rank + 1) * ctx.batch)
        return grad[rows], None, None  # (B, D)


def gather_features(
    image_embeds: Tensor,
    text_embeds: Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int,
    world_size: int,
) -> tuple[Tensor, Tensor]:
    """Concatenate every process's (B, D) batch into (G, D) = (W * B, D), rank order.

    Needs an initialised ``torch.distributed`` process group (imported only here) and
    the same B on every process.

    * ``gather_with_grad=True``: an all_gather whose backward sums the gradients of every
      process for each slice (a reduce-scatter, see ``_AllGatherWithGrad``). Every
      process then holds W times the single-process gradient of its local embeddings
      (exactly, with ``local_loss`` too), which DDP's averaging divides back by W.
    * ``gather_with_grad=False``: a plain all_gather (no gradient); unless ``local_loss``,
      the local slice is replaced by the local tensor (open_clip's trick) so that each
      process gets the exact single-process gradient of its own embeddings (DDP's averaging
      then scales the parameter gradient by 1/W, harmless for Adam).

    Args:
        image_embeds: (B, D) this process's image embeddings.
        text_embeds: (B, D) this process's text embeddings.
        local_loss: the loss will use only the local rows (see ``distributed_clip_loss``).
        gather_with_grad: let gradients flow through the gather.
        rank: this process's rank.
        world_size: the number of processes W.

    Returns:
        ``(all_image_embeds, all_text_embeds)``, each (G, D).
    """
    import torch.distributed as dist

    _check_pair(image_embeds, text_embeds)
    if gather_with_grad:
        all_image = _AllGatherWithGrad.apply(image_embeds, rank, world_size)  # (G, D)
        all_text = _AllGatherWithGrad.apply(text_embeds, rank, world_size)  # (G, D)
        return all_image, all_text
    gathered_image = [torch.zeros_like(image_embeds) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_embeds) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_embeds)
    dist.all_gather(gathered_text, text_embeds)
    if not local_loss:  # the local slice carries the gradient, the others are constants
        gathered_image[rank] = image_embeds
        gathered_text[rank] = text_embeds
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


def distributed_clip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int,
    world_size: int,
) -> Tensor:
    """The CLIP loss over the global batch G = W * B, called by every process on its slice.

    * ``local_loss=False``: every process builds the full (G, G) logits; the loss equals
      the single-process ``clip_loss`` on the whole batch.
    * ``local_loss=True``: each process scores only its B rows against all G columns, with
      targets ``arange(B) + rank * B`` (its pairs' positions in the global batch); the
      mean of the W losses equals the single-process loss. Use with
      ``gather_with_grad=True``, otherwise the gradients from the other processes' rows
      are lost.

    Args:
        image_embeds: (B, D) this process's image embeddings.
        text_embeds: (B, D) this process's text embeddings.
        logit_scale: s = 1 / tau, already exponentiated.
        local_loss: see above.
        gather_with_grad: see ``gather_features``.
        rank: this process's rank.
        world_size: the number of processes W.

    Returns:
        The scalar loss of this process.
    """
    _check_pair(image_embeds, text_embeds)
    image_embeds = F.normalize(image_embeds, dim=-1)  # per row: normalising before the
    text_embeds = F.normalize(text_embeds, dim=-1)  # gather is the same as after it
    all_image, all_text = gather_features(
        image_embeds,
        text_embeds,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        rank=rank,
        world_size=world_size,
    )
    if local_loss:
        logits_per_image = logit_scale * image_embeds @ all_text.T  # (B, G)
        logits_per_text = logit_scale * text_embeds @ all_image.T  # (B, G)
        B = image_embeds.shape[0]
        labels = torch.arange(B, device=image_embeds.device) + rank * B  # (B,)
    else:
        logits_per_image = logit_scale * all_image @ all_text.T  # (G, G)
        logits_per_text = logits_per_image.T  # (G, G)
        labels = torch.arange(all_image.shape[0], device=image_embeds.device)  # (G,)
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


# --- 5b. The loss of one batch, for mmcourse.train.fit -----------------------------------


class PairObjective:
    """``fit``'s ``loss_fn`` for a two-tower model that owns its logit scale (and bias).

    A batch is ``(images, text)``, or ``(images, text, labels)`` for the multi-positive
    loss. The towers run (under ``fit``'s autocast); the loss runs in float32 on their
    (B, E) embeddings with the model's ``logit_scale()`` (open_clip's and ``transformers``'
    ``CLIPModel``'s design: the temperature is a weight of the model, saved and
    all-reduced with the rest), plus its ``logit_bias`` for SigLIP. Under DDP the wrapped
    model's own module provides them.

    Args:
        loss: :class:`ClipLoss` (the default; its distributed options included),
            :class:`SigLipLoss`, or any ``(u, v, logit_scale, *labels) -> scalar`` callable.

    Taught in notebooks/06_contrastive_learning_and_clip; reused by 07, 12-15.
    """

    def __init__(self, loss: Callable[..., Tensor] | None = None) -> None:
        self.loss = ClipLoss() if loss is None else loss

    def __call__(self, model: nn.Module, batch: Sequence) -> Tensor:
        images, text, *labels = batch
        image_embeds, text_embeds = model(images, text)  # (B, E) each
        owner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
        scale = owner.logit_scale()
        with torch.autocast(image_embeds.device.type, enabled=False):  # the loss in float32
            u, v = image_embeds.float(), text_embeds.float()
            if isinstance(self.loss, SigLipLoss):
                if getattr(owner, "logit_bias", None) is None:
                    raise ValueError(
                        "SigLipLoss needs a model with a learned logit bias: build it with "
                        "logit_bias_init (the paper's -10) and logit_scale_init=10"
                    )
                return self.loss(u, v, scale, owner.logit_bias, *labels)
            return self.loss(u, v, scale, *labels)


# --- 6. Using the towers: zero-shot classification and retrieval -----------------------


def zero_shot_classifier(
    class_names: Sequence[str],
    templates: Sequence[str],
    encode_text: Callable[[list[str]], Tensor],
) -> Tensor:
    """Build a zero-shot classifier from class names by prompt ensembling (CLIP §3.1.4).

    For each class c: embed every template filled with the name ("a photo of a {}."),
    L2-normalise each prompt embedding, average over the templates, re-normalise.

    Args:
        class_names: C names, e.g. ``["circle", "square"]``.
        templates: T format strings, each with one ``{}``, e.g. ``["a photo of a {}."]``.
        encode_text: a callable from a list of N strings to an (N, D) tensor (the text
            tower). Call this under ``torch.no_grad()`` when evaluating.

    Returns:
        (C, D) unit-norm class embeddings, row c for ``class_names[c]``.
    """
    if isinstance(class_names, str) or isinstance(templates, str):
        raise ValueError("class_names and templates must be sequences of strings, not a str")
    if len(class_names) == 0 or len(templates) == 0:
        raise ValueError(
            f"need at least one class name and one template, got {len(class_names)} "
            f"and {len(templates)}"
        )
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"each template must contain exactly one '{{}}', got {template!r}")
    C, T = len(class_names), len(templates)
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = encode_text(prompts)
    if not isinstance(embeds, Tensor) or embeds.dim() != 2 or embeds.shape[0] != C * T:
        shape = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(
            f"encode_text must return a (N, D) tensor for N={C * T} prompts "
            f"({C} classes x {T} templates), got {shape}"
        )
    embeds = F.normalize(embeds, dim=-1).reshape(C, T, -1)  # (C, T, D)
    return F.normalize(embeds.mean(dim=1), dim=-1)  # (C, D)


def zero_shot_predict(image_embeds: Tensor, classifier: Tensor) -> Tensor:
    """Predict each image's class: the class embedding with the highest cosine similarity.

    Args:
        image_embeds: (B, D) image embeddings (need not be normalised).
        classifier: (C, D) class embeddings from ``zero_shot_classifier``.

    Returns:
        (B,) predicted class indices (long).
    """
    if (
        image_embeds.dim() != 2
        or classifier.dim() != 2
        or image_embeds.shape[1] != classifier.shape[1]
    ):
        raise ValueError(
            "expected image_embeds (B, D) and classifier (C, D) with the same D, got "
            f"{tuple(image_embeds.shape)} and {tuple(classifier.shape)}"
        )
    scores = F.normalize(image_embeds, dim=-1) @ F.normalize(classifier, dim=-1).T  # (B, C)
    return scores.argmax(dim=-1)


def _ranks(similarity: Tensor, positives: Tensor) -> Tensor:
    """1-based rank of the best positive of each row; ties count against the query."""
    best_positive = similarity.masked_fill(~positives, -math.inf).amax(dim=1, keepdim=True)
    beaten_by = (similarity >= best_positive) & ~positives  # negatives scoring as high
    return 1 + beaten_by.sum(dim=1)


def retrieval_metrics(
    similarity: Tensor,
    text_to_image: Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K and median rank for image -> text and text -> image retrieval.

    Rank of a query = 1 + the number of wrong candidates scoring at least as high as its
    best correct one (ties count against the query, so that a collapsed model, all
    similarities equal, gets the worst ranks and not perfect ones). R@K is the fraction of
    queries with rank <= K; the median is numpy's (mean of the middle two when even).

    Args:
        similarity: (N_i, N_t) scores, image i against text j (e.g. cosine similarities).
        text_to_image: optional (N_t,) index of the image each text describes, for several
            captions per image (COCO has 5); an image query is then correct at its
            best-ranked caption. Default: N_i == N_t and text i describes image i.
        ks: the K of R@K.

    Returns:
        A dict with ``"image_to_text_R@K"``, ``"text_to_image_R@K"`` for each K and
        ``"image_to_text_median_rank"``, ``"text_to_image_median_rank"`` (1-based), floats.
    """
    if similarity.dim() != 2:
        raise ValueError(f"expected a (N_i, N_t) similarity matrix, got {tuple(similarity.shape)}")
    n_images, n_texts = similarity.shape
    device = similarity.device
    if text_to_image is None:
        if n_images != n_texts:
            raise ValueError(
                "without text_to_image, text i describes image i, so the similarity matrix "
                f"must be square, got {tuple(similarity.shape)}"
            )
        text_to_image = torch.arange(n_texts, device=device)
    if text_to_image.shape != (n_texts,):
        raise ValueError(
            f"expected text_to_image of shape ({n_texts},), got {tuple(text_to_image.shape)}"
        )
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image must hold image indices in [0, {n_images})")
    # positives[i, j]: text j describes image i
    positives = text_to_image.to(device)[None, :] == torch.arange(n_images, device=device)[:, None]
    if not positives.any(dim=1).all():
        raise ValueError("every image needs at least one text in text_to_image")
    similarity = similarity.float()
    ranks = {
        "image_to_text": _ranks(similarity, positives),  # (N_i,)
        "text_to_image": _ranks(similarity.T, positives.T),  # (N_t,)
    }
    metrics: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            metrics[f"{direction}_R@{k}"] = (r <= k).sum().item() / r.numel()
        metrics[f"{direction}_median_rank"] = r.float().quantile(0.5).item()
    return metrics
