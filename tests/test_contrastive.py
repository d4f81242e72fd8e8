"""The contrastive losses against brute-force loops and transformers, in value and gradient.

Also: the source's soft-target loss and its collapse incentive, the distributed gather
(2 gloo processes) against the single-process loss, zero-shot prompt ensembling and
retrieval metrics on hand-made inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mmcourse.contrastive import (
    ClipLoss,
    LogitScale,
    SigLipLoss,
    clip_loss,
    distributed_clip_loss,
    info_nce,
    multi_positive_clip_loss,
    retrieval_metrics,
    siglip_loss,
    soft_target_clip_loss,
    zero_shot_classifier,
    zero_shot_predict,
)

# Tiny models: one CPU thread is fastest (and does not fight other processes for cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force_clip_loss(u, v, s):
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    B = u.shape[0]
    total = 0.0
    for i in range(B):  # image i must pick text i among all texts, and text i image i
        row = torch.stack([s * u[i] @ v[j] for j in range(B)])
        col = torch.stack([s * u[j] @ v[i] for j in range(B)])
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * B)


@pytest.mark.parametrize("B,D", [(1, 4), (5, 8), (16, 32)])
def test_clip_loss_value_and_gradient(B, D):
    # imported here, not at the top: the distributed test's worker processes import this
    # module, and transformers would add seconds to each of them
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss as hf_clip_loss

    torch.manual_seed(B)
    u = torch.randn(B, D, requires_grad=True)
    v = torch.randn(B, D, requires_grad=True)
    s = torch.tensor(7.5, requires_grad=True)
    ours = clip_loss(u, v, s)
    loop = brute_force_clip_loss(u, v, s)
    # transformers takes the text-by-image logits matrix
    hf = hf_clip_loss(s * F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T)
    torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(ours, (u, v, s))
    g_loop = torch.autograd.grad(loop, (u, v, s))
    for a, b in zip(g_ours, g_loop, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clip_loss_perfect_alignment_and_chance():
    v = torch.eye(8)
    assert clip_loss(v, v, 100.0) < 1e-3
    assert math.isclose(clip_loss(v, v, 0.0).item(), math.log(8), rel_tol=1e-6)


def test_clip_loss_shape_errors():
    with pytest.raises(ValueError, match=r"got \(4, 8\) and \(4, 7\)"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 7), 1.0)


def test_logit_scale_init_and_clamp():
    scale = LogitScale()
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == 100.0
    with pytest.raises(ValueError, match="init must be in"):
        LogitScale(init=0.0)


# --- ClipLoss and info_nce --------------------------------------------------------------


def test_clip_loss_module_matches_function_and_the_model_owned_scale():
    torch.manual_seed(0)
    u, v = torch.randn(6, 8), torch.randn(6, 8)
    loss_fn = ClipLoss()  # one process: no torch.distributed process group needed
    assert not torch.distributed.is_initialized() and not list(loss_fn.parameters())
    torch.testing.assert_close(loss_fn(u, v, 1 / 0.07), clip_loss(u, v, 1 / 0.07))
    labels = torch.tensor([0, 1, 0, 2, 3, 1])  # with labels: the multi-positive loss
    torch.testing.assert_close(
        loss_fn(u, v, 5.0, labels), multi_positive_clip_loss(u, v, 5.0, labels)
    )
    scale = LogitScale()  # what a model owns: ln s, clamped at 100 where used
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(math.log(500.0))
    assert scale().item() == 100.0
    # the scale is learned in log space and gets a gradient through the loss
    with torch.no_grad():
        scale.log_scale.fill_(math.log(5.0))
    loss_fn(u, v, scale()).backward()
    assert scale.log_scale.grad is not None and scale.log_scale.grad.abs() > 0


def brute_force_info_nce(q, k, tau, targets):
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    total = 0.0
    for n in range(q.shape[0]):  # -log exp(q.k+/tau) / sum_m exp(q.k_m/tau)
        scores = [torch.exp(q[n] @ k[m] / tau) for m in range(k.shape[0])]
        total = total - torch.log(scores[targets[n]] / torch.stack(scores).sum())
    return total / q.shape[0]


@pytest.mark.parametrize("N,M", [(4, 4), (3, 7)])
def test_info_nce_matches_loop(N, M):
    torch.manual_seed(N * M)
    q = torch.randn(N, 5, requires_grad=True)
    k = torch.randn(M, 5, requires_grad=True)
    for targets in (None, torch.randint(0, M, (N,))):
        t = torch.arange(N) if targets is None else targets
        ours = info_nce(q, k, temperature=0.3, targets=targets)
        loop = brute_force_info_nce(q, k, 0.3, t)
        torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)
        for a, b in zip(
            torch.autograd.grad(ours, (q, k)), torch.autograd.grad(loop, (q, k)), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clip_loss_is_mean_of_two_info_nce_directions():
    torch.manual_seed(1)
    u, v = torch.randn(9, 16), torch.randn(9, 16)
    s = 12.0
    both = (info_nce(u, v, temperature=1 / s) + info_nce(v, u, temperature=1 / s)) / 2
    torch.testing.assert_close(clip_loss(u, v, s), both)


def test_info_nce_shape_errors():
    with pytest.raises(ValueError, match=r"got \(4, 8\) and \(4, 7\)"):
        info_nce(torch.randn(4, 8), torch.randn(4, 7), temperature=1.0)
    with pytest.raises(ValueError, match="at least N=4"):
        info_nce(torch.randn(4, 8), torch.randn(3, 8), temperature=1.0)
    with pytest.raises(ValueError, match=r"targets of shape \(4,\), got \(3,\)"):
        info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=1.0, targets=torch.zeros(3))


# --- SigLIP -----------------------------------------------------------------------------


def brute_force_siglip_loss(u, v, s, b):
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    B = u.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (s * u[i] @ v[j] + b)))
    return total / B


def transformers_siglip_loss(image_embeds, text_embeds, logit_scale_log, logit_bias):
    """SiglipModel.forward's loss, step for step (transformers/models/siglip/modeling_siglip.py)."""
    image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    logits_per_text = torch.matmul(text_embeds, image_embeds.t())
    logits_per_text = logits_per_text * logit_scale_log.exp() + logit_bias
    eye = torch.eye(logits_per_text.size(0))
    m1_diag1 = -torch.ones_like(logits_per_text) + 2 * eye
    loglik = torch.nn.functional.logsigmoid(m1_diag1 * logits_per_text)
    nll = -torch.sum(loglik, dim=-1)
    return nll.mean()


def test_transformers_siglip_loss_source_is_the_one_we_copied():
    import inspect

    from transformers.models.siglip import modeling_siglip

    source = inspect.getsource(modeling_siglip.SiglipModel.forward)
    for line in (
        "logits_per_text = logits_per_text * logit_scale.exp() + logit_bias",
        "m1_diag1 = -torch.ones_like(logits_per_text) + 2 * eye",
        "loglik = torch.nn.functional.logsigmoid(m1_diag1 * logits_per_text)",
        "nll = -torch.sum(loglik, dim=-1)",
        "loss = nll.mean()",
    ):
        assert line in source


@pytest.mark.parametrize("B,D", [(1, 4), (6, 8)])
def test_siglip_loss_value_and_gradient(B, D):
    torch.manual_seed(B + 10)
    u = torch.randn(B, D, requires_grad=True)
    v = torch.randn(B, D, requires_grad=True)
    t = torch.tensor(math.log(10.0), requires_grad=True)  # the paper's t' = log 10
    b = torch.tensor(-3.0, requires_grad=True)
    ours = siglip_loss(u, v, t.exp(), b)
    loop = brute_force_siglip_loss(u, v, t.exp(), b)
    hf = transformers_siglip_loss(u, v, t, b)
    for ref in (loop, hf):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        g_ours = torch.autograd.grad(ours, (u, v, t, b), retain_graph=True)
        g_ref = torch.autograd.grad(ref, (u, v, t, b), retain_graph=True)
        for a, c in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_siglip_module_value():
    loss_fn = SigLipLoss()
    torch.manual_seed(2)
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(loss_fn(u, v, 10.0, -10.0), siglip_loss(u, v, 10.0, -10.0))
    with pytest.raises(ValueError, match=r"got \(5, 8\) and \(4, 8\)"):
        loss_fn(u, v[:4], 10.0, -10.0)


# --- the source's soft-target CLIPLoss: the collapse incentive --------------------------


def source_clip_loss(image_features, text_features, temperature=1.0):
    """004 §4.2's CLIPLoss.forward verbatim, with its undefined cross_entropy filled in."""

    def cross_entropy(preds, targets, reduction="none"):
        loss = (-targets * torch.nn.LogSoftmax(dim=-1)(preds)).sum(1)
        return loss if reduction == "none" else loss.mean()

    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = torch.matmul(image_features, text_features.T) / temperature
    images_similarity = image_features @ image_features.T
    texts_similarity = text_features @ text_features.T
    targets = F.softmax((images_similarity + texts_similarity) / 2 * temperature, dim=-1)
    texts_loss = cross_entropy(logits, targets, reduction="none")
    images_loss = cross_entropy(logits.T, targets.T, reduction="none")
    loss = (images_loss + texts_loss) / 2.0
    return loss.mean()


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_soft_target_loss_is_the_source_code(temperature):
    torch.manual_seed(3)
    u, v = torch.randn(7, 8), torch.randn(7, 8)
    torch.testing.assert_close(
        soft_target_clip_loss(u, v, temperature), source_clip_loss(u, v, temperature)
    )


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_soft_target_loss_prefers_collapse_and_clip_loss_does_not(temperature):
    B = 8
    aligned = torch.eye(B)  # image i == text i, all pairs distinct (orthonormal)
    collapsed = torch.ones(B, B)  # every image and every text is the same vector
    soft_collapsed = soft_target_clip_loss(collapsed, collapsed, temperature)
    soft_aligned = soft_target_clip_loss(aligned, aligned, temperature)
    assert soft_collapsed < soft_aligned  # the pitfall: collapse is rewarded
    s = 1 / temperature
    assert clip_loss(aligned, aligned, s) < clip_loss(collapsed, collapsed, s)
    assert math.isclose(clip_loss(collapsed, collapsed, s).item(), math.log(B), rel_tol=1e-6)


def test_soft_target_loss_at_the_source_default_barely_separates():
    B = 8
    aligned, collapsed = torch.eye(B), torch.ones(B, B)
    gap = soft_target_clip_loss(collapsed, collapsed) - soft_target_clip_loss(aligned, aligned)
    clip_gap = clip_loss(collapsed, collapsed, 1 / 0.07) - clip_loss(aligned, aligned, 1 / 0.07)
    assert 0 < gap < 0.1 < math.log(B) - 1e-3 < clip_gap


def _train_free_embeddings(loss_fn, steps=200):
    torch.manual_seed(4)
    u = torch.randn(8, 16, requires_grad=True)
    v = torch.randn(8, 16, requires_grad=True)
    opt = torch.optim.Adam([u, v], lr=0.05)
    # at tau = 0.07 the softmax tails underflow into denormal floats, which make a CPU
    # 50x slower; flushing them to zero changes no result here
    torch.set_flush_denormal(True)
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(u, v).backward()
            opt.step()
    finally:
        torch.set_flush_denormal(False)
    with torch.no_grad():
        return F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T  # (B, B) cosines


def test_training_free_embeddings_soft_targets_collapse_clip_aligns():
    # CLIP's loss separates every pair: perfect retrieval with a clear margin
    cos = _train_free_embeddings(lambda u, v: clip_loss(u, v, 1 / 0.07))
    off_diag = cos.masked_fill(torch.eye(8, dtype=torch.bool), -2.0)
    assert (cos.diag() - off_diag.amax(dim=1)).min() > 0.3
    assert retrieval_metrics(cos)["image_to_text_R@1"] == 1.0
    # soft targets at tau = 0.07: every image is equally similar to every text
    cos = _train_free_embeddings(lambda u, v: soft_target_clip_loss(u, v, 0.07))
    assert cos.max() - cos.min() < 0.05
    # soft targets at the source's tau = 1: pairs merge, retrieval fails
    cos = _train_free_embeddings(lambda u, v: soft_target_clip_loss(u, v, 1.0))
    assert retrieval_metrics(cos)["image_to_text_R@1"] < 0.5


# --- distributed: 2 gloo processes, each with half of the global batch ------------------

G, D_DIST, WORLD = 8, 6, 2
MODES = {  # name: (local_loss, gather_with_grad)
    "full_with_grad": (False, True),
    "local_with_grad": (True, True),
    "full_no_grad": (False, False),
}


def _global_batch():
    gen = torch.Generator().manual_seed(123)
    return torch.randn(G, D_DIST, generator=gen), torch.randn(G, D_DIST, generator=gen)


def _distributed_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        u_all, v_all = _global_batch()
        B = G // WORLD
        results = {}
        for name, (local_loss, gather_with_grad) in MODES.items():
            u = u_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)  # (B, D)
            v = v_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            s = torch.tensor(9.0, requires_grad=True)
            loss = distributed_clip_loss(
                u,
                v,
                s,
                local_loss=local_loss,
                gather_with_grad=gather_with_grad,
                rank=rank,
                world_size=WORLD,
            )
            loss.backward()
            results[name] = (loss.detach(), u.grad, v.grad, s.grad)
        # the module path: ClipLoss with world_size > 1 gives the same loss
        module = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
        u = u_all[rank * B : (rank + 1) * B]
        v = v_all[rank * B : (rank + 1) * B]
        results["module_local_loss"] = module(u, v, 9.0).detach()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # nobody tears the group down while another still talks
    finally:
        dist.destroy_process_group()


def test_distributed_gather_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(
        _distributed_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    u_all, v_all = _global_batch()
    u_all.requires_grad_(True)
    v_all.requires_grad_(True)
    s = torch.tensor(9.0, requires_grad=True)
    loss = clip_loss(u_all, v_all, s)
    gu, gv, gs = torch.autograd.grad(loss, (u_all, v_all, s))
    B = G // WORLD

    def check(name, *, grad_factor, per_rank_loss):
        losses = torch.stack([res[name][0] for res in ranks])
        if per_rank_loss:  # every process computes the whole loss
            for value in losses:
                torch.testing.assert_close(value, loss.detach(), atol=1e-5, rtol=1e-5)
        else:  # each process its share: the mean over processes is the whole loss
            torch.testing.assert_close(losses.mean(), loss.detach(), atol=1e-5, rtol=1e-5)
        for r, res in enumerate(ranks):
            rows = slice(r * B, (r + 1) * B)
            # grad_factor: what each process holds, as a multiple of the single-process
            # gradient of its own rows (DDP then averages over the W processes)
            torch.testing.assert_close(res[name][1], grad_factor * gu[rows], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(res[name][2], grad_factor * gv[rows], atol=1e-5, rtol=1e-4)
        # the scale is not gathered: DDP's average over processes is the true gradient
        mean_gs = torch.stack([res[name][3] for res in ranks]).mean()
        torch.testing.assert_close(mean_gs, gs, atol=1e-5, rtol=1e-4)

    # the gather's backward sums the W processes' gradients of each slice
    check("full_with_grad", grad_factor=WORLD, per_rank_loss=True)
    check("local_with_grad", grad_factor=WORLD, per_rank_loss=False)
    # open_clip's trick: the local slice alone carries the exact gradient of its rows
    check("full_no_grad", grad_factor=1, per_rank_loss=True)
    module_losses = torch.stack([res["module_local_loss"] for res in ranks])
    torch.testing.assert_close(module_losses.mean(), loss.detach(), atol=1e-5, rtol=1e-5)


# --- zero-shot classification -----------------------------------------------------------


def test_zero_shot_classifier_is_normalised_mean_of_normalised_prompts():
    # a fake text tower: a fixed, known vector per prompt
    table = {
        "a photo of a cat": torch.tensor([3.0, 0.0, 0.0]),
        "a drawing of a cat": torch.tensor([0.0, 0.5, 0.0]),
        "a photo of a dog": torch.tensor([0.0, 0.0, 2.0]),
        "a drawing of a dog": torch.tensor([1.0, 1.0, 1.0]),
    }
    calls = []

    def encode_text(texts):
        calls.append(list(texts))
        return torch.stack([table[t] for t in texts])

    classifier = zero_shot_classifier(
        ["cat", "dog"], ["a photo of a {}", "a drawing of a {}"], encode_text
    )
    assert classifier.shape == (2, 3)
    cat = F.normalize(torch.tensor([1.0, 1.0, 0.0]) / 2, dim=0)  # mean of e1 and e2
    dog = F.normalize((torch.tensor([0.0, 0.0, 1.0]) + torch.ones(3) / 3**0.5) / 2, dim=0)
    torch.testing.assert_close(classifier, torch.stack([cat, dog]))
    assert sorted(calls[0]) == sorted(table)  # every prompt embedded, in one call
    images = torch.tensor([[5.0, 4.0, 0.0], [0.0, 0.1, 3.0], [1.0, 0.9, 0.0]])
    assert zero_shot_predict(images, classifier).tolist() == [0, 1, 0]


def test_zero_shot_errors():
    encode = lambda texts: torch.randn(len(texts), 4)
    with pytest.raises(ValueError, match="at least one class name"):
        zero_shot_classifier([], ["a {}"], encode)
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_classifier(["cat"], ["a photo"], encode)
    with pytest.raises(ValueError, match="not a str"):
        zero_shot_classifier("cat", ["a {}"], encode)
    with pytest.raises(ValueError, match=r"N=4 prompts \(2 classes x 2 templates\), got \(3, 4\)"):
        zero_shot_classifier(["a", "b"], ["{}", "a {}"], lambda t: torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"got \(2, 4\) and \(3, 5\)"):
        zero_shot_predict(torch.randn(2, 4), torch.randn(3, 5))


# --- retrieval metrics ------------------------------------------------------------------


def test_retrieval_metrics_perfect():
    metrics = retrieval_metrics(torch.eye(12))
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert metrics[f"{direction}_R@{k}"] == 1.0
        assert metrics[f"{direction}_median_rank"] == 1.0


def test_retrieval_metrics_known_ranks():
    N = 12
    # image i ranks text i at position rank[i] (1-based); text i's scores give another order
    image_ranks = torch.tensor([1, 1, 2, 3, 5, 6, 7, 10, 11, 12, 1, 4])
    sim = torch.zeros(N, N)
    for i in range(N):
        others = [j for j in range(N) if j != i]
        order = others[: image_ranks[i] - 1] + [i] + others[image_ranks[i] - 1 :]
        for position, j in enumerate(order):  # higher score = earlier
            sim[i, j] = N - position + 100 * (N - i)  # rows far apart: columns ordered by row
    m = retrieval_metrics(sim)
    assert m["image_to_text_R@1"] == 3 / 12
    assert m["image_to_text_R@5"] == 7 / 12
    assert m["image_to_text_R@10"] == 10 / 12
    assert m["image_to_text_median_rank"] == 4.5  # sorted: 1 1 1 2 3 [4 5] 6 7 10 11 12
    # text j's column: rows scaled by 100 * (N - i), so image 0 always comes first
    assert m["text_to_image_R@1"] == 1 / 12
    assert m["text_to_image_median_rank"] == 6.5  # text j is ranked j + 1


def test_retrieval_metrics_permutation_and_ties():
    perm = torch.tensor([1, 0, 2, 3])  # image 0 <-> text 1 swapped
    sim = torch.eye(4)[perm]  # image i's best text is perm[i]
    m = retrieval_metrics(sim)
    assert m["image_to_text_R@1"] == 0.5 and m["text_to_image_R@1"] == 0.5
    # the swapped ones tie (0) with 2 other texts below the 1: rank 4 pessimistically
    assert m["image_to_text_median_rank"] == 2.5
    # a collapsed model (all scores equal) gets the worst ranks, not perfect ones
    flat = retrieval_metrics(torch.ones(5, 5))
    assert flat["image_to_text_R@1"] == 0.0 and flat["image_to_text_median_rank"] == 5.0


def test_retrieval_metrics_several_captions_per_image():
    # 2 images, 4 texts: texts 0, 2 describe image 0, texts 1, 3 image 1
    text_to_image = torch.tensor([0, 1, 0, 1])
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.7, 0.1, 0.6, 0.3]])
    m = retrieval_metrics(sim, text_to_image)
    # image 0: best caption text 0 at rank 1; image 1: texts 0, 2 beat its best (0.3): rank 3
    assert m["image_to_text_R@1"] == 0.5 and m["image_to_text_median_rank"] == 2.0
    # text 0 -> image 0 (0.9 > 0.7) ok; text 1 -> image 1 (0.1 < 0.8) rank 2; text 2 (0.1
    # < 0.6) rank 2; text 3 (0.3 > 0.2) ok
    assert m["text_to_image_R@1"] == 0.5 and m["text_to_image_median_rank"] == 1.5


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match=r"must be square, got \(3, 4\)"):
        retrieval_metrics(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"text_to_image of shape \(4,\), got \(3,\)"):
        retrieval_metrics(torch.randn(2, 4), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_metrics(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"got \(4,\)"):
        retrieval_metrics(torch.randn(4))
