"""mmcourse.train: schedule, AdamW written out, the loop (overfit, early stop, best restore, resume)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from mmcourse.train import (
    FitResult,
    ShuffledBatches,
    TrainConfig,
    accuracy,
    adamw_step,
    fit,
    lr_at,
    make_scheduler,
    predict,
    to_device,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(seed=0, n=32, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def _model(seed=0, d=6, c=3, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, 16), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(16), nn.Linear(16, c)
    )


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _cfg(**kw):
    base = dict(progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# --- schedule -----------------------------------------------------------------------------


def _torch_lrs(factory, steps, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt, **kw)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_equals_transformers():
    cfg = _cfg(max_steps=50, warmup_steps=7, schedule="cosine")
    ref = _torch_lrs(get_cosine_schedule_with_warmup, 50, num_warmup_steps=7, num_training_steps=50)
    assert [lr_at(s, cfg) for s in range(51)] == pytest.approx(ref, abs=1e-12)
    cfg = _cfg(max_steps=50, warmup_steps=7, schedule="linear")
    ref = _torch_lrs(get_linear_schedule_with_warmup, 50, num_warmup_steps=7, num_training_steps=50)
    assert [lr_at(s, cfg) for s in range(51)] == pytest.approx(ref, abs=1e-12)
    cfg = _cfg(max_steps=50, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1)
    ref = _torch_lrs(
        get_cosine_with_min_lr_schedule_with_warmup,
        50,
        num_warmup_steps=5,
        num_training_steps=50,
        min_lr_rate=0.1,
    )
    assert [lr_at(s, cfg) for s in range(51)] == pytest.approx(ref, abs=1e-12)


def test_schedule_endpoints():
    cfg = _cfg(max_steps=100, warmup_steps=10, min_lr_ratio=0.2)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.6)  # half-way down the cosine: (1 + 0.2) / 2
    assert lr_at(100, cfg) == pytest.approx(0.2)
    assert lr_at(1000, cfg) == pytest.approx(0.2)
    const = _cfg(max_steps=100, warmup_steps=10, schedule="constant")
    assert [lr_at(s, const) for s in (10, 50, 100)] == [1.0, 1.0, 1.0]
    lin = _cfg(max_steps=100, schedule="linear")
    assert lr_at(0, lin) == 1.0 and lr_at(50, lin) == pytest.approx(0.5) and lr_at(100, lin) == 0.0
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)


def test_make_scheduler_scales_lr():
    cfg = _cfg(max_steps=20, warmup_steps=4, lr=0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    for s in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_at(s, cfg))
        opt.step()
        sched.step()


# --- AdamW written out --------------------------------------------------------------------


def test_adamw_step_equals_torch():
    torch.manual_seed(0)
    theta0 = torch.randn(5, 4)
    p = nn.Parameter(theta0.clone())
    opt = torch.optim.AdamW([p], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    theta, m, v = theta0.clone(), torch.zeros_like(theta0), torch.zeros_like(theta0)
    target = torch.randn(5, 4)
    for t in range(1, 8):
        opt.zero_grad()
        loss = ((p - target) ** 2 * torch.arange(1.0, 5.0)).sum()
        loss.backward()
        grad = p.grad.detach().clone()
        opt.step()
        theta, m, v = adamw_step(
            theta, grad, m, v, t=t, lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1
        )
        torch.testing.assert_close(theta, p.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], atol=1e-7, rtol=1e-6)


def test_adamw_step_bad_inputs():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        adamw_step(z, torch.zeros(4), z, z, t=1, lr=0.1)
    with pytest.raises(ValueError, match="t must"):
        adamw_step(z, z, z, z, t=0, lr=0.1)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"warmup_steps": 300}, "warmup_steps"),
        ({"schedule": "step"}, "schedule"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"eval_every": 0}, "eval_every"),
        ({"patience": 0}, "patience"),
        ({"mode": "best"}, "mode"),
        ({"precision": "fp16"}, "precision"),
        ({"metric": ""}, "metric"),
    ],
)
def test_bad_config(kw, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**kw)


def test_fit_bad_inputs():
    x, y = _data()
    model = _model()
    with pytest.raises(ValueError, match="checkpoint_path"):
        fit(model, [(x, y)], loss_fn=_loss, config=_cfg(max_steps=2), resume=True)
    with pytest.raises(ValueError, match="empty"):
        fit(model, [], loss_fn=_loss, config=_cfg(max_steps=2))
    with pytest.raises(ValueError, match="config.metric"):
        fit(
            model,
            [(x, y)],
            loss_fn=_loss,
            config=_cfg(max_steps=2, eval_every=1),
            evaluate_fn=lambda m: {"acc": 1.0},
        )
    with pytest.raises(ValueError, match="scalar"):
        fit(
            model,
            [(x, y)],
            loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
            config=_cfg(max_steps=1),
        )
    frozen = _model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        fit(frozen, [(x, y)], loss_fn=_loss, config=_cfg(max_steps=1))


def test_to_device_nested():
    batch = {"a": torch.zeros(2), "b": [torch.ones(1), (torch.ones(1), "s")], "c": 3}
    out = to_device(batch, "cpu")
    assert out["c"] == 3 and out["b"][1][1] == "s" and isinstance(out["b"][1], tuple)


# --- the loop -----------------------------------------------------------------------------


def test_overfits_one_batch():
    x, y = _data(n=16)
    model = _model()
    result = fit(model, [(x, y)], loss_fn=_loss, config=_cfg(max_steps=150, lr=0.02))
    assert isinstance(result, FitResult) and result.steps == 150 and not model.training
    assert result.history[0]["loss"] > 0.5
    assert _loss(model, (x, y)).item() < 0.02
    assert (model(x).argmax(-1) == y).all()


def test_log_fn_and_a_dict_loss_add_to_each_history_row():
    x, y = _data(n=16)
    model = _model()

    def parts(model, batch):  # the total is minimised; the parts are recorded
        x, y = batch
        ce = F.cross_entropy(model(x), y)
        penalty = 1e-3 * model[0].weight.square().sum()
        return {"loss": ce + penalty, "ce": ce, "penalty": penalty}

    result = fit(
        model,
        [(x, y)],
        loss_fn=parts,
        config=_cfg(max_steps=5),
        log_fn=lambda m: {"bias0": m[0].bias[0]},
    )
    for row in result.history:
        assert row["loss"] == pytest.approx(row["ce"] + row["penalty"], rel=1e-6)
        assert set(row) >= {"step", "loss", "lr", "grad_norm", "ce", "penalty", "bias0"}
    assert result.history[-1]["bias0"] == pytest.approx(model[0].bias[0].item())
    with pytest.raises(ValueError, match="without 'loss'"):
        fit(_model(), [(x, y)], loss_fn=lambda m, b: {"ce": _loss(m, b)}, config=_cfg(max_steps=1))
    with pytest.raises(ValueError, match="scalar tensor, got float"):
        fit(_model(), [(x, y)], loss_fn=lambda m, b: 1.0, config=_cfg(max_steps=1))


def test_early_stopping_and_best_restore():
    x, y = _data()
    model = _model()
    values = iter([0.5, 0.7, 0.6, 0.65, 0.69, 0.9, 0.95])
    snapshots = {}

    def evaluate(m):
        snapshots[len(snapshots)] = {k: v.clone() for k, v in m.state_dict().items()}
        assert not m.training and not torch.is_grad_enabled()
        return {"accuracy": next(values)}

    cfg = _cfg(max_steps=100, eval_every=3, patience=3, lr=0.01)
    result = fit(model, [(x, y)], loss_fn=_loss, config=cfg, evaluate_fn=evaluate)
    assert result.stopped_early and result.steps == 15  # 5 evaluations: 0.7 at the 2nd, then 3 bad
    assert result.best_metric == 0.7 and result.best_step == 6
    assert [r["step"] for r in result.evaluations()] == [3, 6, 9, 12, 15]
    for k, v in model.state_dict().items():  # the weights seen at the best evaluation
        torch.testing.assert_close(v, snapshots[1][k], atol=0, rtol=0)


def test_patience_running_out_at_the_last_step_is_no_early_stop():
    x, y = _data()
    values = iter([0.9, 0.5, 0.5, 0.5])
    cfg = _cfg(max_steps=12, eval_every=3, patience=3, lr=0.01)
    result = fit(
        _model(),
        [(x, y)],
        loss_fn=_loss,
        config=cfg,
        evaluate_fn=lambda m: {"accuracy": next(values)},
    )
    assert result.steps == 12 and result.best_step == 3 and not result.stopped_early


def test_mode_min_and_no_restore():
    x, y = _data()
    model = _model()
    values = iter([3.0, 2.0, 2.5])
    cfg = _cfg(max_steps=9, eval_every=3, metric="loss", mode="min", restore_best=False)
    result = fit(
        model, [(x, y)], loss_fn=_loss, config=cfg, evaluate_fn=lambda m: {"loss": next(values)}
    )
    assert result.best_metric == 2.0 and result.best_step == 6 and not result.stopped_early


def test_grad_clip_is_effective():
    x, y = _data()
    big = lambda m, b: 1000.0 * _loss(m, b)  # noqa: E731
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = _cfg(max_steps=1, lr=1.0, grad_clip=0.5, weight_decay=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    result = fit(model, [(x, y)], loss_fn=big, config=cfg, optimizer=opt)
    step = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    assert result.history[0]["grad_norm"] > 0.5  # the norm before clipping, reported
    assert step.norm().item() == pytest.approx(0.5, rel=1e-4)  # SGD moved by lr * clipped norm


def test_resume_gives_the_same_run(tmp_path):
    x, y = _data(n=48)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    values = [0.1, 0.3, 0.2, 0.4, 0.35, 0.36]

    def make_eval():
        it = iter(values)
        return lambda m: {"accuracy": next(it)}

    cfg = _cfg(max_steps=24, eval_every=4, warmup_steps=3, lr=0.01)
    ref_model = _model(dropout=0.2)
    torch.manual_seed(1)
    ref = fit(ref_model, batches, loss_fn=_loss, config=cfg, evaluate_fn=make_eval())

    path = str(tmp_path / "ckpt.pt")
    cut = _cfg(max_steps=24, eval_every=4, warmup_steps=3, lr=0.01, checkpoint_path=path)
    model = _model(dropout=0.2)
    torch.manual_seed(1)
    ev = make_eval()
    first = TrainConfig(**{**cut.__dict__, "max_steps": 24})
    # interrupt after 10 steps: an evaluate_fn that raises at the 3rd evaluation (step 12)
    calls = {"n": 0}

    def interrupting(m):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return ev(m)

    with pytest.raises(KeyboardInterrupt):
        fit(model, batches, loss_fn=_loss, config=first, evaluate_fn=interrupting)
    fresh = _model(seed=5, dropout=0.2)  # different weights: all must come from the checkpoint
    torch.manual_seed(123)  # a different RNG state: restored from the checkpoint
    resumed = fit(fresh, batches, loss_fn=_loss, config=cut, evaluate_fn=ev, resume=True)
    assert resumed.steps == ref.steps == 24
    assert [r["loss"] for r in resumed.history] == pytest.approx(
        [r["loss"] for r in ref.history], abs=1e-6
    )
    assert resumed.best_step == ref.best_step == 16
    for a, b in zip(ref_model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_only_trainable_parameters_change():
    x, y = _data()
    model = _model()
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    fit(model, [(x, y)], loss_fn=_loss, config=_cfg(max_steps=5, lr=0.1))
    assert torch.equal(model[0].weight, frozen)


def test_bf16_autocast_on_cpu_runs():
    x, y = _data()
    model = _model()
    result = fit(
        model, [(x, y)], loss_fn=_loss, config=_cfg(max_steps=30, lr=0.02, precision="bf16")
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert next(model.parameters()).dtype == torch.float32  # master weights stay float32


@pytest.mark.gpu
def test_bf16_on_gpu_overfits():
    x, y = _data(n=16)
    model = _model()
    result = fit(
        model, [(x, y)], loss_fn=_loss, config=TrainConfig(max_steps=150, lr=0.02, progress=False)
    )
    assert result.history[-1]["loss"] < 0.1
    assert next(model.parameters()).device.type != "cpu"
    assert math.isfinite(result.history[-1]["loss"])


# --- under torchrun: DistributedDataParallel, each process a shard of every batch --------

WORLD = 2


def _ddp_problem():
    """A tiny regression model and 6 global batches of 8 examples, the same in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(6)
    ]
    return model, batches


def _mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)  # a mean over examples: DDP's average of shards = the whole


_DDP_CONFIG = dict(
    max_steps=9, lr=1e-2, warmup_steps=2, grad_clip=None, eval_every=3, progress=False
)


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, batches = _ddp_problem()
        shard = [(x[rank::WORLD], y[rank::WORLD]) for x, y in batches]  # (4, 5), (4, 1) each
        config = TrainConfig(**_DDP_CONFIG, device="cpu", checkpoint_path=f"{out_dir}/ckpt.pt")
        result = fit(DistributedDataParallel(model), shard, loss_fn=_mse, config=config)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
        torch.save([row["loss"] for row in result.history], f"{out_dir}/losses{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fit_under_ddp_equals_one_process_on_whole_batches(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, batches = _ddp_problem()
    result = fit(model, batches, loss_fn=_mse, config=TrainConfig(**_DDP_CONFIG, device="cpu"))
    for rank in range(WORLD):  # every process logs the whole batch's loss: its shards' mean
        losses = torch.tensor(torch.load(tmp_path / f"losses{rank}.pt"))
        torch.testing.assert_close(losses, torch.tensor([row["loss"] for row in result.history]))
        theirs = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in model.state_dict().items():
            torch.testing.assert_close(theirs[name], value, atol=1e-6, rtol=1e-5)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert saved["step"] == 9 and set(saved["model"]) == {f"module.{k}" for k in model.state_dict()}


def test_shuffled_batches_are_epochs_of_permutations_and_repeatable():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = ShuffledBatches(x, y, batch_size=3, num_batches=7, seed=1)
    first = list(batches)
    assert len(batches) == 7 and len(first) == 7
    for bx, by in first:
        assert bx.shape == (3, 1) and torch.equal(bx[:, 0].long(), by)  # rows stay paired
    for epoch in (first[0:3], first[3:6]):  # 3 full batches per epoch, the 10th row dropped
        rows = torch.cat([by for _, by in epoch])
        assert len(set(rows.tolist())) == 9
    assert not torch.equal(first[0][1], first[3][1])  # a new permutation each epoch
    again = list(batches)  # iterating again gives the same batches
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    other = list(ShuffledBatches(x, y, batch_size=3, num_batches=7, seed=2))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    assert len(ShuffledBatches(x, batch_size=4)) == 2  # one epoch by default


def test_shuffled_batches_reject_bad_input():
    with pytest.raises(ValueError, match="first dimension"):
        ShuffledBatches(torch.zeros(4, 2), torch.zeros(5), batch_size=2)
    with pytest.raises(ValueError, match="exceeds"):
        ShuffledBatches(torch.zeros(4, 2), batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatches(torch.zeros(4, 2), batch_size=0)
    with pytest.raises(ValueError, match="tensors"):
        ShuffledBatches(batch_size=2)


def test_fit_trains_from_shuffled_batches():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    result = fit(
        model,
        ShuffledBatches(x, y, batch_size=16, num_batches=40),
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        config=TrainConfig(max_steps=40, lr=0.1, progress=False, device="cpu"),
    )
    assert result.steps == 40 and result.history[-1]["loss"] < result.history[0]["loss"]


class _PerRowModel(nn.Module):
    """Adds its inputs (tensor, list or dict) and applies dropout + a linear map."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x, scale=None):
        if isinstance(x, dict):
            x = sum(x.values())
        elif isinstance(x, list):
            x = sum(x)
        out = self.linear(self.dropout(x))
        return out if scale is None else out * scale


@pytest.mark.parametrize("kind", ["tensor", "list", "tuple", "dict"])
def test_predict_and_accuracy_equal_a_loop_over_examples(kind):
    torch.manual_seed(0)
    model = _PerRowModel().train()
    a, b = torch.randn(37, 4), torch.randn(37, 4)
    labels = torch.randint(0, 3, (37,))
    inputs = {"tensor": a + b, "list": [a, b], "tuple": (a, b), "dict": {"a": a, "b": b}}[kind]
    with torch.no_grad():
        model.eval()
        loop = torch.stack([model.linear(a[i] + b[i]) for i in range(37)])
        model.train()
    out = predict(model, inputs, batch_size=8)
    assert model.training  # its mode is restored
    torch.testing.assert_close(out, loop, atol=1e-6, rtol=1e-6)
    assert not out.requires_grad
    expected = (loop.argmax(-1) == labels).float().mean().item()
    assert accuracy(model, inputs, labels, batch_size=5) == pytest.approx(expected)
    # keyword arguments reach the model; None ones are left out
    torch.testing.assert_close(predict(model, inputs, scale=2.0), 2 * loop, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(predict(model, inputs, scale=None), loop, atol=1e-6, rtol=1e-6)


def test_predict_train_mode_keeps_dropout_active():
    torch.manual_seed(0)
    model = _PerRowModel().eval()
    x = torch.randn(64, 4)
    assert not torch.equal(predict(model, x, train_mode=True), predict(model, x))
    assert not model.training


def test_predict_and_accuracy_bad_inputs():
    model = _PerRowModel()
    with pytest.raises(ValueError, match="same first"):
        predict(model, [torch.randn(3, 4), torch.randn(4, 4)])
    with pytest.raises(ValueError, match="expected inputs"):
        predict(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, torch.randn(3, 4), batch_size=0)
    with pytest.raises(ValueError, match=r"labels of shape \(3,\)"):
        accuracy(model, torch.randn(3, 4), torch.zeros(4, dtype=torch.long))
