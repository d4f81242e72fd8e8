"""Data-parallel CLIP: torchrun with 2 gloo processes trains exactly like one process.

The main test launches ``python -m torch.distributed.run --nproc_per_node 2 -m
mmcourse.distributed`` on 127.0.0.1 and compares its per-step losses and final weights with
the single-process run of the same global batches. The SigLIP gather is checked in value and
gradient with 2 spawned gloo processes, as tests/test_contrastive.py does for CLIP.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mmcourse.clip import (
    PairBatches,
    TinyClip,
    TinyClipConfig,
    WordTokenizer,
    clip_recipe,
    record_logit_scale,
)
from mmcourse.contrastive import ClipLoss, PairObjective, distributed_clip_loss, siglip_loss
from mmcourse.distributed import (
    DistributedContext,
    DistributedSigLipLoss,
    LocalBatches,
    ScalingConfig,
    distributed_siglip_loss,
    global_batch_indices,
    init_distributed,
    main,
    read_torchrun_env,
    run_clip_training,
    split_global_batch,
    weights_checksum,
)
from mmcourse.train import ShuffledBatches, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"steps": 6, "batch_size": 16, "num_pairs": 64, "width": 16, "embed_dim": 16}
TINY.update({"heads": 2, "warmup_steps": 2, "device": "cpu"})
# The keys' bias of attention has a zero gradient in exact arithmetic (q . (k + b) adds
# q . b to every score of a row, which the softmax ignores); what reaches it is rounding
# noise (~1e-9, below Adam's eps), which Adam's normalisation amplifies (up to its eps) into
# steps of a fraction of lr, different in every run. Compared separately.
ZERO_GRADIENT = "k_proj.bias"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_args(config: dict) -> list[str]:
    args = []
    for key, value in config.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# --- the torchrun command: 2 processes == 1 process --------------------------------------


def test_torchrun_two_processes_equal_one_process(tmp_path):
    out, weights = tmp_path / "result.json", tmp_path / "weights.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += ["-m", "mmcourse.distributed", *_cli_args(TINY), "--threads", "1"]
    command += ["--out", str(out), "--save-weights", str(weights)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joined the gloo group" in done.stderr  # rank 0's log; rank 1 logs nothing
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2 and distributed["local_batch_size"] == 8
    assert distributed["backend"] == "gloo"

    single = run_clip_training(ScalingConfig(**TINY, threads=1), save_weights=tmp_path / "w1.pt")
    assert single["world_size"] == 1 and single["backend"] is None
    assert len(distributed["losses"]) == len(single["losses"]) == TINY["steps"]
    torch.testing.assert_close(
        torch.tensor(distributed["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(distributed["logit_scale"]),
        torch.tensor(single["logit_scale"]),
        atol=1e-5,
        rtol=0,
    )
    w2, w1 = torch.load(weights), torch.load(tmp_path / "w1.pt")
    assert w2.keys() == w1.keys() and "logit_scale.log_scale" in w1  # the model owns it
    for name in w1:
        if not name.endswith(ZERO_GRADIENT):
            torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0, msg=name)
    for key in ("sum", "abs_sum"):
        assert distributed["checksum"][key] == pytest.approx(single["checksum"][key], abs=0.1)


# --- pieces of the loop ------------------------------------------------------------------


def test_read_torchrun_env():
    assert read_torchrun_env({}) == (0, 0, 1)
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert read_torchrun_env(env) == (3, 1, 4)
    with pytest.raises(ValueError, match="RANK must be an integer"):
        read_torchrun_env({"RANK": "zero"})
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        read_torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_init_distributed_alone_and_without_torchrun(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert context == DistributedContext() and context.is_main and context.backend is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT is not set: launch with"):
        init_distributed("cpu")


def test_global_batches_split_into_the_same_pairs():
    batches = list(global_batch_indices(10, 4, 5, seed=3))
    assert [len(b) for b in batches] == [4] * 5
    assert len(set(torch.cat(batches[:2]).tolist())) == 8  # no repeats within an epoch
    again = list(global_batch_indices(10, 4, 5, seed=3))  # every process draws the same
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    # the W local batches together are exactly the global batch, in rank order
    for W in (1, 2, 4):
        parts = [split_global_batch(batches[0], rank=r, world_size=W) for r in range(W)]
        assert torch.equal(torch.cat(parts), batches[0])
    with pytest.raises(ValueError, match="does not split into 3 equal local batches"):
        split_global_batch(batches[0], rank=0, world_size=3)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        split_global_batch(batches[0], rank=2, world_size=2)
    with pytest.raises(ValueError, match="larger than the 10 pairs"):
        next(global_batch_indices(10, 12, 1, seed=0))


def _tiny_clip_data():
    config = ScalingConfig(**TINY)
    from mmcourse.distributed import build_data, build_model

    images, text, tokenizer = build_data(config)
    return config, images, text, tokenizer, build_model


def test_single_process_run_is_chapter_06s_training():
    """W = 1: ``run_clip_training`` is fit with chapter 06's PairObjective and recipe, on
    the same batches: equal step for step on untrimmed captions; with chapter 06's
    PairBatches (which trims the padding) equal up to rounding, which Adam amplifies on the
    zero-gradient key bias (see ZERO_GRADIENT) to about 1e-3 after a few steps."""
    config, images, text, tokenizer, build_model = _tiny_clip_data()
    ours = run_clip_training(config)
    recipe = clip_recipe(config.steps, lr=config.lr, warmup_steps=config.warmup_steps)
    for batches, atol in (
        (LocalBatches(images, text, batch_size=16, num_batches=config.steps, seed=config.seed), 0),
        (PairBatches(images, text, batch_size=config.batch_size, seed=config.seed), 3e-3),
    ):
        model = build_model(config, len(tokenizer), seed=config.seed)
        theirs = fit(
            model, batches, loss_fn=PairObjective(), config=recipe, log_fn=record_logit_scale
        )
        torch.testing.assert_close(
            torch.tensor(ours["losses"]),
            torch.tensor([row["loss"] for row in theirs.history]),
            atol=atol,
            rtol=0,
        )
        assert ours["logit_scale"][-1] == pytest.approx(
            theirs.history[-1]["logit_scale"], abs=max(atol, 1e-6)
        )
    assert ours["images_per_second"] > 0 and len(ours["logit_scale"]) == config.steps


def test_local_batches_are_the_global_batches_sliced():
    config, images, text, *_ = _tiny_clip_data()
    whole = list(LocalBatches(images, text, batch_size=16, num_batches=6, seed=2))
    rows = list(ShuffledBatches(torch.arange(len(images)), batch_size=16, num_batches=6, seed=2))
    for (batch_images, _), (index,) in zip(whole, rows, strict=True):
        assert torch.equal(batch_images, images[index])
    halves = [
        list(LocalBatches(images, text, batch_size=16, num_batches=6, seed=2, rank=r, world_size=2))
        for r in range(2)
    ]
    for step, (first, second) in enumerate(zip(*halves, strict=True)):
        assert torch.equal(torch.cat([first[0], second[0]]), whole[step][0])
        assert first[1]["input_ids"].shape == (8, text["input_ids"].shape[1])  # padding kept
    with pytest.raises(ValueError, match="must be divisible by the world size W=2"):
        LocalBatches(images, text, batch_size=15, num_batches=1, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="one caption per image"):
        LocalBatches(images[:10], text, batch_size=8, num_batches=1, seed=0)


def test_one_batch_overfit():
    config, images, text, tokenizer, build_model = _tiny_clip_data()
    model = build_model(config, len(tokenizer), seed=0)
    pairs = (images[:8], {k: v[:8] for k, v in text.items()})
    result = fit(
        model,
        LocalBatches(*pairs, batch_size=8, num_batches=100, seed=0),
        loss_fn=PairObjective(),
        config=clip_recipe(100, lr=3e-3, warmup_steps=5),
    )
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.1 * losses[0]  # measured: 2.13 -> 0.05


def test_weights_checksum():
    a = TinyClip(TinyClipConfig(vocab_size=12, vision_dim=16, text_dim=16, embed_dim=8))
    b = TinyClip(TinyClipConfig(vocab_size=12, vision_dim=16, text_dim=16, embed_dim=8))
    b.load_state_dict(a.state_dict())
    assert weights_checksum(a) == weights_checksum(b)
    with torch.no_grad():
        b.image_projection.weight[0, 0] += 1e-3
    assert weights_checksum(a)["sha256"] != weights_checksum(b)["sha256"]
    assert weights_checksum(b)["sum"] == pytest.approx(weights_checksum(a)["sum"] + 1e-3, abs=1e-5)


def test_siglip_single_process_run():
    result = run_clip_training(ScalingConfig(**{**TINY, "steps": 3}, loss="siglip"))
    assert len(result["losses"]) == 3 and all(x == x for x in result["losses"])


def test_command_line_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["--batch-size", "30"])
    assert exit_info.value.code == 2
    assert (
        "--batch-size 30 (the global batch) must be divisible by the 4" in capsys.readouterr().err
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    for argv, phrase in [
        (["--steps", "0"], "steps must be a positive integer"),
        (["--width", "30", "--heads", "4"], "heads=4 must divide width=30"),
        (["--batch-size", "64", "--num-pairs", "32"], "batch_size=64 is larger than num_pairs"),
        (["--out", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--loss", "infonce"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert phrase in capsys.readouterr().err, argv


def test_command_line_single_process(monkeypatch, tmp_path):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "r.json"
    assert main([*_cli_args({**TINY, "steps": 2}), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and len(result["losses"]) == 2
    assert set(result["checksum"]) == {"sum", "abs_sum", "sha256"}


# --- SigLIP over gathered texts: 2 spawned gloo processes --------------------------------

G, D, WORLD = 8, 6, 2


def _global_batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(G, D, generator=gen), torch.randn(G, D, generator=gen)


def _siglip_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        u_all, v_all = _global_batch()
        B = G // WORLD
        u = u_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)  # (B, D)
        v = v_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        s = torch.tensor(5.0, requires_grad=True)
        b = torch.tensor(-2.0, requires_grad=True)
        loss = distributed_siglip_loss(u, v, s, b, rank=rank, world_size=WORLD)
        loss.backward()
        module = DistributedSigLipLoss(rank=rank, world_size=WORLD)
        module_loss = module(u.detach(), v.detach(), 5.0, -2.0).detach()
        # the pitfall: local_loss without gather_with_grad loses the other rows' gradients
        u2 = u.detach().clone().requires_grad_(True)
        v2 = v.detach().clone().requires_grad_(True)
        wrong = distributed_clip_loss(
            u2, v2, 4.0, local_loss=True, gather_with_grad=False, rank=rank, world_size=WORLD
        )
        wrong.backward()
        result = (loss.detach(), u.grad, v.grad, s.grad, b.grad, module_loss, u2.grad)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_siglip_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_siglip_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    u_all, v_all = _global_batch()
    u_all.requires_grad_(True)
    v_all.requires_grad_(True)
    s = torch.tensor(5.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    loss = siglip_loss(u_all, v_all, s, b)
    gu, gv, gs, gb = torch.autograd.grad(loss, (u_all, v_all, s, b))
    B = G // WORLD
    losses = torch.stack([res[0] for res in ranks])
    torch.testing.assert_close(losses.mean(), loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack([res[5] for res in ranks]), losses)
    for r, res in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        # each process holds W times the gradient of its rows (DDP's average divides by W)
        torch.testing.assert_close(res[1], WORLD * gu[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res[2], WORLD * gv[rows], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([res[3] for res in ranks]).mean(), gs)
    torch.testing.assert_close(torch.stack([res[4] for res in ranks]).mean(), gb)

    u_all2 = u_all.detach().clone().requires_grad_(True)
    (true_grad,) = torch.autograd.grad(ClipLoss()(u_all2, v_all.detach(), 4.0) * WORLD, (u_all2,))
    lost = torch.cat([res[6] for res in ranks])
    assert (lost - true_grad).abs().max() > 1e-3  # the gradient is wrong without the gather's


def test_word_tokenizer_is_shared_by_every_process():
    # every process builds the vocabulary from the same generated captions: same ids
    config = ScalingConfig(**TINY)
    from mmcourse.distributed import build_data

    _, text_a, tok_a = build_data(config)
    _, text_b, tok_b = build_data(config)
    assert isinstance(tok_a, WordTokenizer) and tok_a.id_to_token == tok_b.id_to_token
    assert torch.equal(text_a["input_ids"], text_b["input_ids"])
