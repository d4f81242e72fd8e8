"""Exercises for notebooks/15_scaling_out."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from mmcourse.contrastive import clip_loss
from mmcourse.exercises import Exercise, Mismatch, call, expect_close

# --- 1. one process's share of the CLIP loss --------------------------------------------


def _local_clip_loss_solution(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    logit_scale: float,
    rank: int,
) -> torch.Tensor:
    B = image_local.shape[0]
    labels = torch.arange(B) + rank * B  # my pairs' places in the global batch
    logits_per_image = logit_scale * image_local @ all_text.T  # (B, G)
    logits_per_text = logit_scale * text_local @ all_image.T  # (B, G)
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def _unit(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def _check_local_clip_loss(fn) -> None:
    gen = torch.Generator().manual_seed(15)
    for W, B, D, s in [(2, 4, 6, 10.0), (4, 3, 5, 14.3), (1, 5, 4, 7.0), (3, 2, 8, 20.0)]:
        u, v = _unit(gen, W * B, D), _unit(gen, W * B, D)  # (G, D), already normalised
        for rank in range(W):
            rows = slice(rank * B, (rank + 1) * B)
            what = f"rank {rank} of W={W} processes, B={B}, logit_scale={s}"
            got = call(fn, u[rows], v[rows], u, v, s, rank, what=what)
            expected = _local_clip_loss_solution(u[rows], v[rows], u, v, s, rank)
            wrong = (
                isinstance(got, torch.Tensor)
                and got.numel() == 1
                and abs(float(got) - float(expected)) > 1e-4
            )
            if wrong:
                got_f = float(got)
                if (
                    rank > 0
                    and abs(got_f - float(_local_clip_loss_solution(u[rows], v[rows], u, v, s, 0)))
                    < 1e-4
                ):
                    raise Mismatch(
                        f"{what}: your targets are arange(B), the same on every process; "
                        "process r's pair i sits at column r * B + i of the gathered batch"
                    )
                if abs(got_f - float(clip_loss(u, v, s))) < 1e-4:
                    raise Mismatch(
                        f"{what}: that is the loss of the whole (G, G) matrix; with local_loss "
                        "each process scores only its own B rows against the G columns"
                    )
                labels = torch.arange(B) + rank * B
                one_way = F.cross_entropy(s * u[rows] @ v.T, labels)
                if abs(got_f - float(one_way)) < 1e-4:
                    raise Mismatch(
                        f"{what}: only the image -> text direction; CLIP averages it with "
                        "text -> image (your texts against all gathered images)"
                    )
                unscaled = _local_clip_loss_solution(u[rows], v[rows], u, v, 1.0, rank)
                if abs(got_f - float(unscaled)) < 1e-4:
                    raise Mismatch(f"{what}: the logits must be multiplied by logit_scale")
            expect_close(got, expected, f"the loss of {what}")


q1 = Exercise(
    "Exercise 1: one process's share of the CLIP loss (local_loss)",
    checker=_check_local_clip_loss,
    hints=[
        "Your images (B, D) against all G texts: logit_scale * image_local @ all_text.T is (B, G); "
        "the same for your texts against all images.",
        "The correct text of your image i is at column rank * B + i of the gathered batch: "
        "labels = torch.arange(B) + rank * B. Then average the two cross-entropies.",
    ],
    solution_fn=_local_clip_loss_solution,
)

# --- 2. the largest global batch whose logits fit ------------------------------------------


def _largest_batch_solution(
    memory_bytes: int, world_size: int, local_loss: bool, bytes_per_element: int = 4
) -> int:
    elements = memory_bytes // bytes_per_element  # logits that fit
    # without local_loss: G * G <= elements; with it: (G / W) * G <= elements
    G = math.isqrt(elements * world_size) if local_loss else math.isqrt(elements)
    # the global batch must split into W equal local batches (0 if not even G = W fits)
    return G - G % world_size


def _logits_elements(G: int, W: int, local: bool) -> int:
    return (G // W if local else G) * G


def _check_largest_batch(fn) -> None:
    GiB = 1024**3
    cases = [
        (4 * GiB, 256, False, 4),
        (4 * GiB, 256, True, 4),
        (GiB // 2, 8, True, 2),
        (GiB // 2, 8, False, 2),
        (10**6, 3, True, 4),
        (10**6, 7, False, 4),
        (5 * 10**7, 6, True, 2),
        (100, 8, False, 4),  # 25 logits: not even G = 8 fits -> 0
        (20, 8, True, 4),  # 5 logits, but G = 8 with local_loss needs 1 x 8 -> 0
    ]
    for memory, W, local, nbytes in cases:
        what = (
            f"memory_bytes={memory:,}, world_size={W}, local_loss={local}, "
            f"bytes_per_element={nbytes}"
        )
        got = call(fn, memory, W, local, nbytes, what=what)
        expected = _largest_batch_solution(memory, W, local, nbytes)
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        if isinstance(got, bool) or not isinstance(got, (int, float)) or got != int(got):
            raise Mismatch(f"{what}: expected a whole number of pairs, got {got!r}")
        G = int(got)
        if G == expected:
            continue
        if expected == 0:
            raise Mismatch(
                f"{what}: not even G = world_size (one pair per process) fits; return 0, got {G:,}"
            )
        if G % W:
            raise Mismatch(
                f"{what}: G={G:,} does not split into {W} equal local batches; round down "
                "to a multiple of world_size"
            )
        square = math.isqrt(memory // nbytes * W * W)  # (G / W)^2 <= n: G <= W sqrt(n)
        if local and G == square - square % W:
            raise Mismatch(
                f"{what}: that budgets (B, B) = (G/W, G/W) logits; after the gather each of "
                "the B local rows is scored against all G texts: (B, G)"
            )
        if G == _largest_batch_solution(memory * nbytes, W, local, nbytes):
            raise Mismatch(f"{what}: you counted elements, not bytes (x bytes_per_element)")
        if _logits_elements(G, W, local) * nbytes > memory:
            raise Mismatch(
                f"{what}: G={G:,} needs {_logits_elements(G, W, local) * nbytes:,} bytes of "
                "logits, more than memory_bytes"
            )
        raise Mismatch(f"{what}: a larger global batch fits: expected {expected:,}, got {G:,}")


q2 = Exercise(
    "Exercise 2: the largest global batch whose logits fit on each process",
    checker=_check_largest_batch,
    hints=[
        "Without local_loss a process holds G x G logits; with it (G / W) x G. "
        "Divide memory_bytes by bytes_per_element to get how many logits fit.",
        "Solve G * G <= n (or G * G / W <= n) with math.isqrt (exact for big integers), then "
        "round G down to a multiple of world_size: G - G % world_size (0 when G < W).",
    ],
    solution_fn=_largest_batch_solution,
)

# --- 3. gradient caching: a big contrastive batch in small chunks -----------------------------


def _grad_cache_solution(
    image_tower: nn.Module,
    text_tower: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: float,
    chunk_size: int,
) -> torch.Tensor:
    # 1) embed the whole batch chunk by chunk, without keeping any graph
    with torch.no_grad():
        u = torch.cat([image_tower(x) for x in images.split(chunk_size)])  # (G, E)
        v = torch.cat([text_tower(t) for t in texts.split(chunk_size)])  # (G, E)
    # 2) the full-batch loss, differentiated w.r.t. the embeddings only (cheap)
    u.requires_grad_(True)
    v.requires_grad_(True)
    loss = clip_loss(u, v, logit_scale)
    loss.backward()
    # 3) each chunk again, now with its graph, fed the cached embedding gradient
    for x, g in zip(images.split(chunk_size), u.grad.split(chunk_size), strict=True):
        image_tower(x).backward(g)
    for t, g in zip(texts.split(chunk_size), v.grad.split(chunk_size), strict=True):
        text_tower(t).backward(g)
    return loss.detach()


class _Watched(nn.Module):
    """A linear tower that records the batch size of every call that builds a graph."""

    def __init__(self, linear: nn.Linear, seen: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen.append(x.shape[0])
        return self.linear(x)


def _check_grad_cache(fn) -> None:
    gen = torch.Generator().manual_seed(3)
    for G, chunk, s in [(12, 4, 10.0), (16, 8, 14.0), (9, 3, 5.0), (8, 8, 10.0)]:
        images, texts = torch.randn(G, 6, generator=gen), torch.randn(G, 5, generator=gen)
        torch.manual_seed(G)
        ref_image, ref_text = nn.Linear(6, 4), nn.Linear(5, 4)
        ref_loss = clip_loss(ref_image(images), ref_text(texts), s)
        ref_loss.backward()
        seen: list[int] = []
        image_tower = _Watched(nn.Linear(6, 4), seen)
        text_tower = _Watched(nn.Linear(5, 4), seen)
        image_tower.linear.load_state_dict(ref_image.state_dict())
        text_tower.linear.load_state_dict(ref_text.state_dict())
        what = f"G={G} pairs in chunks of {chunk}"
        got = call(fn, image_tower, text_tower, images, texts, s, chunk, what=what)
        grads = [p.grad for p in (*image_tower.parameters(), *text_tower.parameters())]
        if any(g is None for g in grads):
            raise Mismatch(f"{what}: some tower parameters got no gradient; call .backward()")
        if seen and max(seen) > chunk:
            raise Mismatch(
                f"{what}: a tower ran with gradients on {max(seen)} rows at once; the point "
                f"is never to hold the graph of more than chunk_size={chunk} rows"
            )
        expected = [p.grad for p in (*ref_image.parameters(), *ref_text.parameters())]
        if chunk < G:
            naive = _naive_accumulation(ref_image, ref_text, images, texts, s, chunk)
            if all(torch.allclose(g, n, atol=1e-5) for g, n in zip(grads, naive, strict=True)):
                raise Mismatch(
                    f"{what}: that is plain gradient accumulation: each chunk only saw its "
                    "own chunk_size - 1 negatives. Compute the loss on all G embeddings first"
                )
        expect_close(got, ref_loss.detach(), f"the returned loss for {what}")
        for g, e in zip(grads, expected, strict=True):
            expect_close(g, e, f"a tower gradient for {what} (compared with the full batch)")


def _naive_accumulation(image_tower, text_tower, images, texts, s, chunk):
    image_tower, text_tower = _copy(image_tower), _copy(text_tower)
    n = len(images.split(chunk))
    for x, t in zip(images.split(chunk), texts.split(chunk), strict=True):
        (clip_loss(image_tower(x), text_tower(t), s) / n).backward()
    return [p.grad for p in (*image_tower.parameters(), *text_tower.parameters())]


def _copy(linear: nn.Linear) -> nn.Linear:
    fresh = nn.Linear(linear.in_features, linear.out_features)
    fresh.load_state_dict(linear.state_dict())
    return fresh


q3 = Exercise(
    "Exercise 3: gradient caching - the exact big-batch CLIP gradient in small chunks",
    checker=_check_grad_cache,
    hints=[
        "Step 1 under torch.no_grad(): embed every chunk and concatenate, u (G, E) and v (G, E).",
        "Step 2: u.requires_grad_(True), v.requires_grad_(True); loss = clip_loss(u, v, "
        "logit_scale); loss.backward() fills u.grad and v.grad.",
        "Step 3: for each chunk x with its slice g of u.grad: image_tower(x).backward(g) "
        "(the same for the texts). Return the loss.",
    ],
    solution_fn=_grad_cache_solution,
)

# --- 4. how many negatives? -----------------------------------------------------------------

_WRONG_COUNTS = {
    31: "that is without the gather: only the texts of its own GPU",
    32: "that is the local batch, and one of those texts is the image's own caption",
    256: "one of the 256 gathered texts is the image's own caption, the positive",
    255 * 2: "count one direction: the image's softmax runs over texts only",
    8: "that is the number of GPUs",
}


def _check_negatives(answer) -> None:
    # any integral number: 255, 255.0, numpy.int64(255), torch.tensor(255)
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    whole = isinstance(answer, numbers.Real) and float(answer).is_integer()
    if isinstance(answer, bool) or not whole:
        raise Mismatch(f"answer with a whole number, got {answer!r}")
    answer = int(answer)
    if answer in _WRONG_COUNTS:
        raise Mismatch(f"not {answer}: {_WRONG_COUNTS[answer]}")
    if answer != 255:
        raise Mismatch(f"not {answer}: G = W x B texts are gathered; all but one are negatives")


q4 = Exercise(
    "Exercise 4: 8 GPUs, 32 pairs each, gathered: how many negatives has each image?",
    checker=_check_negatives,
    hints=["After the all-gather every image is compared with G = 8 x 32 texts."],
    solution_text="""
        255. The gather makes the global batch G = 8 x 32 = 256 texts; one is the image's
        own caption (the positive), the other 255 are its negatives - in its row of the
        (B, G) local-loss matrix as in the full (G, G) one. Without the gather it would have
        only 31, and no gradient accumulation would change that.
    """,
)
