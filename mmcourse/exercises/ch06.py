"""Exercises for notebooks/06_contrastive_learning_and_clip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcourse.contrastive import (
    clip_loss,
    multi_positive_clip_loss,
    retrieval_metrics,
    zero_shot_classifier,
)
from mmcourse.exercises import Exercise, Mismatch, call, expect_close, expect_shape

# --- 1. the symmetric CLIP loss ----------------------------------------------------------------


def _clip_loss_solution(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale):
    u = F.normalize(image_embeds, dim=-1)  # (B, D) unit vectors
    v = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * u @ v.T  # (B, B): image i against text j
    targets = torch.arange(len(logits))  # the positive of row i is column i
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _one_direction(u, v, s):
    logits = s * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(logits)))


def _check_clip_loss(fn) -> None:
    gen = torch.Generator().manual_seed(6)
    for B, D, s in [(4, 8, 1 / 0.07), (6, 5, 10.0), (3, 16, 1.0), (8, 4, 50.0)]:
        u = 3 * torch.randn(B, D, generator=gen)  # far from unit length on purpose
        v = u[torch.randperm(B, generator=gen)] + torch.randn(B, D, generator=gen)
        what = f"B={B}, D={D}, logit_scale={s:.3g}"
        got = call(fn, u.clone(), v.clone(), s, what=what)
        expected = clip_loss(u, v, s)
        if (
            isinstance(got, torch.Tensor)
            and got.numel() == 1
            and not torch.allclose(got.detach().reshape(()), expected, atol=1e-4)
        ):
            value = got.detach().reshape(())
            raw = s * u @ v.T
            raw_loss = (
                F.cross_entropy(raw, torch.arange(B)) + F.cross_entropy(raw.T, torch.arange(B))
            ) / 2
            if torch.allclose(value, raw_loss, atol=1e-4):
                raise Mismatch(
                    f"{what}: you forgot to L2-normalise the embeddings; CLIP compares cosines"
                )
            one_way = [_one_direction(u, v, s), _one_direction(v, u, s)]
            if any(torch.allclose(value, d, atol=1e-4) for d in one_way):
                raise Mismatch(
                    f"{what}: that is one direction only; average the image->text loss "
                    "(rows) and the text->image loss (columns, logits.T)"
                )
            if torch.allclose(value, sum(one_way), atol=1e-4):
                raise Mismatch(f"{what}: you summed the two directions; average them (/ 2)")
            if torch.allclose(value, clip_loss(u, v, 1 / s), atol=1e-4):
                raise Mismatch(
                    f"{what}: you divided by logit_scale; it is s = 1 / tau, so multiply by it"
                )
        expect_close(got, expected, f"the CLIP loss for {what}", atol=1e-4)


q1 = Exercise(
    "Exercise 1: the symmetric CLIP loss",
    checker=_check_clip_loss,
    hints=[
        "Normalise both with F.normalize(x, dim=-1), then logits = logit_scale * u @ v.T (B, B).",
        "The positive of row i is column i: targets = torch.arange(B). "
        "F.cross_entropy(logits, targets) is image->text; logits.T gives text->image.",
    ],
    solution_fn=_clip_loss_solution,
)

# --- 2. Recall@K -------------------------------------------------------------------------------


def _recall_solution(similarity: torch.Tensor, k: int) -> float:
    own = similarity.diagonal()[:, None]  # (N, 1): each image's score with its own text
    rank = 1 + (similarity > own).sum(dim=1)  # (N,): 1 + the texts that score higher
    return (rank <= k).float().mean().item()


def _check_recall(fn) -> None:
    gen = torch.Generator().manual_seed(7)
    for N, k in [(10, 5), (20, 3), (10, 1), (7, 7), (30, 10)]:
        sim = torch.randn(N, N, generator=gen) + 1.5 * torch.eye(N)  # no ties (continuous)
        what = f"a ({N}, {N}) similarity matrix and k={k}"
        got = call(fn, sim.clone(), k, what=what)
        expected = retrieval_metrics(sim, ks=(k,))[f"image_to_text_R@{k}"]
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise Mismatch(
                    f"{what}: return one number (a fraction), got shape {tuple(got.shape)}"
                )
            got = got.item()
        try:
            got = float(got)
        except (TypeError, ValueError) as err:
            raise Mismatch(f"{what}: return a float, got {type(got).__name__}") from err
        if abs(got - expected) < 1e-6:
            continue
        wrong = {
            "text_to_image": retrieval_metrics(sim.T, ks=(k,))[f"image_to_text_R@{k}"],
            "k - 1": _recall_solution(sim, k - 1) if k > 1 else -1.0,
            "k + 1": _recall_solution(sim, k + 1),
            "lowest": _recall_solution(-sim, k),
            "count": _recall_solution(sim, k) * N,
        }
        if abs(got - wrong["count"]) < 1e-6 and N > 1:
            raise Mismatch(f"{what}: you returned a count; divide by the number of queries N")
        if abs(got - wrong["lowest"]) < 1e-6:
            raise Mismatch(f"{what}: you ranked the lowest scores first; higher = more similar")
        if abs(got - wrong["text_to_image"]) < 1e-6:
            raise Mismatch(
                f"{what}: that is text -> image (columns); the queries are the images, "
                "the rows of similarity"
            )
        if abs(got - wrong["k - 1"]) < 1e-6 or abs(got - wrong["k + 1"]) < 1e-6:
            raise Mismatch(
                f"{what}: off by one in K: a query counts when its text is at rank 1, 2, ..., K "
                "(rank 1 = the best)"
            )
        raise Mismatch(f"{what}: expected {expected:.4f}, got {got:.4f}")


q2 = Exercise(
    "Exercise 2: Recall@K from a similarity matrix",
    checker=_check_recall,
    hints=[
        "The score of image i with its own text is similarity[i, i] (similarity.diagonal()).",
        "Its rank is 1 + the number of texts j with similarity[i, j] > similarity[i, i]; "
        "R@K is the fraction of images whose rank is <= K.",
        "torch.topk(similarity, k, dim=1).indices holds each row's K best columns; "
        "check whether i is among them.",
    ],
    solution_fn=_recall_solution,
)

# --- 3. a prompt-ensembled zero-shot classifier --------------------------------------------------


def _classifier_solution(class_names, templates, encode_text):
    C, T = len(class_names), len(templates)
    prompts = [t.format(name) for name in class_names for t in templates]  # class-major
    embeds = F.normalize(encode_text(prompts), dim=-1).reshape(C, T, -1)  # (C, T, D)
    return F.normalize(embeds.mean(dim=1), dim=-1)  # (C, D)


def _fake_encoder(dim: int = 6):
    """A deterministic 'text tower': each string gets a fixed random vector of random norm."""

    def encode(texts):
        out = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(text)))
            out.append(torch.randn(dim, generator=g) * (0.2 + 5 * torch.rand(1, generator=g)))
        return torch.stack(out)

    return encode


def _check_classifier(fn) -> None:
    encode = _fake_encoder()
    cases = [
        (["circle", "square", "cross"], ["a {}", "a photo of a {}", "a small {}"]),
        (["red circle", "blue square"], ["{}", "there is a {} on the left"]),
        (["dog", "cat", "bird", "fish"], ["a {}"]),
    ]
    for names, templates in cases:
        what = f"{len(names)} classes and {len(templates)} templates"
        got = call(fn, list(names), list(templates), encode, what=what)
        expected = zero_shot_classifier(names, templates, encode)
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"{what}: expected a torch tensor (C, D), got {type(got).__name__}")
        expect_shape(got, expected.shape, f"class embeddings for {what}")
        got = got.detach().float()
        if len(templates) > 1 and not torch.allclose(got, expected, atol=1e-5):
            C, T = len(names), len(templates)
            raw = encode([t.format(n) for n in names for t in templates]).reshape(C, T, -1)
            if torch.allclose(got, F.normalize(raw.mean(1), dim=-1), atol=1e-5):
                raise Mismatch(
                    f"{what}: normalise each prompt embedding before averaging, or the prompts "
                    "with long vectors outvote the others"
                )
            if torch.allclose(got, F.normalize(raw, dim=-1).mean(1), atol=1e-5):
                raise Mismatch(f"{what}: right direction; now re-normalise the mean to unit length")
            tmajor = encode([t.format(n) for t in templates for n in names]).reshape(T, C, -1)
            mixed = F.normalize(F.normalize(tmajor, dim=-1).reshape(C, T, -1).mean(1), dim=-1)
            if torch.allclose(got, mixed, atol=1e-5):
                raise Mismatch(
                    f"{what}: the prompts were built template by template but reshaped as "
                    "(C, T); build them class by class, or reshape to (T, C) and average dim 0"
                )
        expect_close(got, expected, f"class embeddings for {what}")


q3 = Exercise(
    "Exercise 3: a prompt-ensembled zero-shot classifier",
    checker=_check_classifier,
    hints=[
        "Build all C * T prompts class by class: [t.format(name) for name in class_names for t in templates].",
        "Encode them once, F.normalize each row, reshape to (C, T, D), average over T, "
        "and normalise the mean again.",
    ],
    solution_fn=_classifier_solution,
)

# --- 4. the multi-positive CLIP loss ------------------------------------------------------------


def _multi_positive_solution(image_embeds, text_embeds, logit_scale, labels):
    u = F.normalize(image_embeds, dim=-1)
    v = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * u @ v.T  # (B, B)
    same = (labels[:, None] == labels[None, :]).float()  # (B, B) positives
    q = same / same.sum(dim=1, keepdim=True)  # each row's target sums to 1
    image_to_text = -(q * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(q * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _check_multi_positive(fn) -> None:
    gen = torch.Generator().manual_seed(8)
    cases = [
        (torch.tensor([0, 1, 2, 3]), 10.0),  # all distinct: the CLIP loss
        (torch.tensor([0, 1, 0, 2, 1, 0]), 1 / 0.07),
        (torch.tensor([5, 5, 7, 7, 7]), 3.0),
        (torch.tensor([1, 2, 3, 1, 2, 3, 4, 4]), 20.0),
    ]
    for labels, s in cases:
        B = len(labels)
        u, v = torch.randn(B, 6, generator=gen), torch.randn(B, 6, generator=gen)
        what = f"labels {labels.tolist()} and logit_scale={s:.3g}"
        got = call(fn, u.clone(), v.clone(), s, labels.clone(), what=what)
        expected = multi_positive_clip_loss(u, v, s, labels)
        if (
            isinstance(got, torch.Tensor)
            and got.numel() == 1
            and not torch.allclose(got.detach().reshape(()), expected, atol=1e-4)
        ):
            value = got.detach().reshape(())
            logits = s * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
            same = (labels[:, None] == labels[None, :]).float()
            summed = (
                -(same * logits.log_softmax(1)).sum(1).mean()
                - (same * logits.T.log_softmax(1)).sum(1).mean()
            ) / 2
            if torch.allclose(value, summed, atol=1e-4):
                raise Mismatch(
                    f"{what}: the target of a row must sum to 1: divide the positives mask by "
                    "its row sum (each of k positives gets 1/k)"
                )
            repeats = len(labels.unique()) < B
            if repeats and torch.allclose(value, clip_loss(u, v, s), atol=1e-4):
                raise Mismatch(
                    f"{what}: that is the plain CLIP loss; the repeated labels must count as "
                    "positives too"
                )
            q = same / same.sum(1, keepdim=True)
            one_way = [
                -(q * logits.log_softmax(1)).sum(1).mean(),
                -(q * logits.T.log_softmax(1)).sum(1).mean(),
            ]
            if any(torch.allclose(value, d, atol=1e-4) for d in one_way):
                raise Mismatch(f"{what}: one direction only; average image->text and text->image")
        expect_close(got, expected, f"the multi-positive loss for {what}", atol=1e-4)


q4 = Exercise(
    "Exercise 4: the multi-positive (label-aware) CLIP loss",
    checker=_check_multi_positive,
    hints=[
        "The positives: same = (labels[:, None] == labels[None, :]).float(), a (B, B) mask.",
        "Targets q = same / same.sum(1, keepdim=True); the loss of a row is "
        "-(q * logits.log_softmax(1)).sum(1), and the same with logits.T for the columns.",
    ],
    solution_fn=_multi_positive_solution,
)
