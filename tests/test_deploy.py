"""Timing helpers on synthetic timings, int8 size and accuracy, compile bookkeeping, SDPA
backends against the reference, the KV cache (bytes and decoding equal to ``generate``), ONNX
export equal to PyTorch, and checkpoints that round-trip. No timing is asserted."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mmcourse
from mmcourse import deploy
from mmcourse.clip import TinyClip, TinyClipConfig, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- timing -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 20, 101])
def test_percentile_equals_numpy(n):
    samples = np.random.default_rng(n).exponential(size=n).tolist()
    for q in (0, 5, 50, 90, 95, 99, 100):
        assert deploy.percentile(samples, q) == pytest.approx(np.percentile(samples, q))


def test_latency_stats_on_synthetic_timings():
    samples = [0.010] * 90 + [0.100] * 10  # 10 % slow calls
    stats = deploy.LatencyStats(samples, batch_size=4)
    assert stats.p50_ms == pytest.approx(10.0)
    assert stats.p95_ms == pytest.approx(100.0)  # the slow tail shows in p95, not in p50
    assert stats.mean_ms == pytest.approx(19.0)
    assert stats.throughput == pytest.approx(400.0)
    with pytest.raises(ValueError, match="at least one sample"):
        deploy.percentile([], 50)
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\]"):
        deploy.percentile([1.0], 101)


def test_time_calls_leaves_out_the_warmup():
    calls = []
    stats = deploy.time_calls(lambda: calls.append(1), warmup=3, repeats=5, batch_size=2)
    assert len(calls) == 8 and len(stats.samples_s) == 5 and stats.batch_size == 2
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        deploy.time_calls(lambda: None, repeats=0)


def test_sweep_rows_and_fixed_threads():
    before = torch.get_num_threads()
    with deploy.fixed_threads(1):
        assert torch.get_num_threads() == 1
        rows = deploy.sweep(
            {"a": lambda x: x + 1, "b": lambda x: x * 2}, torch.zeros, [1, 3], repeats=2
        )
    assert torch.get_num_threads() == before
    assert [(r["candidate"], r["batch_size"]) for r in rows] == [
        ("a", 1),
        ("b", 1),
        ("a", 3),
        ("b", 3),
    ]
    assert all(r["p95_ms"] >= r["p50_ms"] > 0 and r["throughput"] > 0 for r in rows)


# --- precision ----------------------------------------------------------------------------


def test_int8_is_smaller_and_agrees_with_float32():
    """Int8 weights shrink the file about 4x; the predictions of a random MLP classifier
    (its own float32 argmax is the label, so float32 scores 1.0) change for under 5 %."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    int8 = deploy.quantize_int8(model)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    ratio = deploy.serialized_bytes(int8) / deploy.serialized_bytes(model)
    assert ratio < 0.4, ratio
    x = torch.randn(2000, 64)
    with torch.no_grad():
        ref, got = model(x), int8(x)
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, agreement
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert deploy.linear_weight_fraction(model) > 0.98


def test_bf16_autocast_runs_matmuls_in_bf16():
    x = torch.randn(4, 8)
    with deploy.autocast_bf16("cpu"):
        assert (x @ x.T).dtype == torch.bfloat16


def test_int8_width_sweep_rows():
    rows = deploy.int8_width_sweep([8, 16], batch_sizes=[1, 4], repeats=1)
    assert [(r["width"], r["batch_size"]) for r in rows] == [(8, 1), (8, 4), (16, 1), (16, 4)]
    assert all(r["speedup"] > 0 for r in rows)
    assert {r["method"] for r in rows} == {"torch.ao dynamic (deprecated)"}
    assert all(0 < r["max_abs_diff"] < 0.1 for r in rows)
    with pytest.raises(ValueError, match="method must be one of"):
        deploy.int8_width_sweep([8], methods=["int4"])
    with pytest.raises(ValueError, match="non-empty list"):
        deploy.int8_width_sweep([8], methods=[])


# torchao (pinned by the course) is required here, not skipped: the chapter's int8 path


@pytest.mark.slow
def test_torchao_int8_is_smaller_and_agrees_with_float32(tmp_path):
    """torchao's int8 (dynamic and weight-only): the original untouched, the checkpoint
    about 4x smaller and loadable with weights_only=True, predictions of a random MLP
    classifier (its own float32 argmax is the label) changed for under 5 %, and each
    Linear equal to the formula x W^T ~ s_x s_W (x_q W_q^T) written out by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    x = torch.randn(2000, 64)
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for mode in deploy.TORCHAO_MODES:
        int8 = deploy.quantize_torchao(model, mode=mode)
        assert type(model[0].weight) is nn.Parameter  # the original is untouched
        assert type(int8[0].weight).__name__ == "Int8Tensor"
        ratio = deploy.serialized_bytes(int8) / deploy.serialized_bytes(model)
        assert ratio < 0.4, (mode, ratio)
        with torch.inference_mode():  # torch.save of its tensors fails there unless handled
            assert deploy.serialized_bytes(int8) == ratio * deploy.serialized_bytes(model)
        path = tmp_path / f"{mode}.pt"
        torch.save(int8.state_dict(), path)
        loaded = torch.load(path, weights_only=True)  # torchao registers its safe types
        assert torch.equal(loaded["0.weight"].qdata, int8[0].weight.qdata)
        with torch.no_grad():
            got = int8(x)
        agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        assert agreement >= 0.95, (mode, agreement)
        errors[mode] = (got - ref).abs().max().item()
        assert errors[mode] < 0.05 * ref.abs().max()
    assert errors["weight-only"] < errors["dynamic"]  # no activation rounding

    # the dynamic Linear by hand: symmetric int8 in [-128, 127], scale = max |row| / 127.5,
    # one scale per weight row and per input row (torchao multiplies by 1 / scale)
    int8 = deploy.quantize_torchao(model, mode="dynamic")
    W, b, xs = model[0].weight.detach(), model[0].bias.detach(), x[:16]
    s_w = W.abs().amax(dim=1, keepdim=True) / 127.5  # (256, 1)
    W_q = torch.round(W * (1 / s_w)).clamp(-128, 127)
    s_x = xs.abs().amax(dim=1, keepdim=True) / 127.5  # (16, 1)
    x_q = torch.round(xs * (1 / s_x)).clamp(-128, 127)
    by_hand = s_x * (x_q @ W_q.T) * s_w.T + b  # (16, 256)
    with torch.no_grad():
        got = int8[0](xs)
    assert torch.equal(int8[0].weight.qdata.float(), W_q)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)


def test_torchao_sweep_and_bad_inputs():
    rows = deploy.int8_width_sweep(
        [16], batch_sizes=[2], methods=list(deploy.INT8_METHODS), repeats=1
    )
    assert [r["method"] for r in rows] == list(deploy.INT8_METHODS)
    assert all(r["speedup"] > 0 and 0 < r["max_abs_diff"] < 0.1 for r in rows)
    with pytest.raises(ValueError, match="mode must be one of"):
        deploy.quantize_torchao(nn.Linear(4, 4), mode="int4")


# --- torch.compile ------------------------------------------------------------------------


def test_compile_result_break_even():
    result = deploy.CompileResult(compile_s=2.0, eager_ms=3.0, compiled_ms=1.0, max_abs_diff=0.0)
    assert result.speedup == pytest.approx(3.0)
    assert result.break_even_calls == 1000  # 2 s / 2 ms saved per call
    slower = deploy.CompileResult(compile_s=2.0, eager_ms=1.0, compiled_ms=1.5, max_abs_diff=0.0)
    assert slower.break_even_calls == math.inf


@pytest.mark.slow
def test_measure_compile_with_a_quick_backend():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    result = deploy.measure_compile(model, torch.randn(4, 8), backend="eager", repeats=3)
    assert result.compile_s >= 0 and result.max_abs_diff == 0.0
    assert result.eager_ms > 0 and result.compiled_ms > 0


# --- attention kernels --------------------------------------------------------------------


def test_attention_backends_checked_against_the_reference():
    rows = deploy.attention_backend_timings([8, 16], batch=1, heads=2, head_dim=4, repeats=1)
    assert [r["length"] for r in rows] == [8, 16]
    for row in rows:
        assert row["reference_ms"] > 0 and row["MATH_ms"] > 0 and row["sdpa_default_ms"] > 0
        assert set(row) >= {f"{b}_ms" for b in deploy.SDPA_BACKENDS}


# --- generation and the KV cache ----------------------------------------------------------

TINY_LLAMA = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.slow
def test_greedy_decode_equals_generate_with_and_without_cache():
    model = deploy.random_llama(num_layers=2, seed=0, **TINY_LLAMA)
    prompt = torch.tensor([[1, 5, 9, 13, 2]])
    cached = deploy.greedy_decode(model, prompt, max_new_tokens=12, use_cache=True)
    full = deploy.greedy_decode(model, prompt, max_new_tokens=12, use_cache=False)
    with torch.no_grad():
        expected = model.generate(
            prompt,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[0, prompt.shape[1] :].tolist()
    assert cached.tokens == expected and full.tokens == expected
    assert len(cached.step_s) == 12 and cached.tokens_per_second > 0
    with pytest.raises(ValueError, match=r"shape \(1, N\)"):
        deploy.greedy_decode(model, prompt[0], max_new_tokens=2)


@pytest.mark.slow
def test_our_decoder_and_transformers_generate_give_the_same_tokens():
    """Chapter 11's from-scratch CausalLM on the transformers model's weights, decoded by
    greedy_decode with and without its cache, equals transformers' own generate (hf_generate)
    with and without the cache."""
    from mmcourse.llm import CausalLM

    model = deploy.random_llama(num_layers=2, seed=1, tie_word_embeddings=False, **TINY_LLAMA)
    ours = CausalLM.from_transformers(model)
    prompt = torch.tensor([[1, 5, 9, 13, 2]])
    results = [
        decode(m, prompt, max_new_tokens=10, use_cache=use_cache)
        for decode, m in ((deploy.hf_generate, model), (deploy.greedy_decode, ours))
        for use_cache in (True, False)
    ]
    expected = results[0].tokens
    assert len(expected) == 10 and len(set(expected)) > 1  # not one token repeated
    assert all(r.tokens == expected for r in results)
    assert all(r.wall_s > 0 and r.tokens_per_second > 0 for r in results)
    assert results[0].step_s == [] and len(results[2].step_s) == 10
    with pytest.raises(ValueError, match=r"shape \(1, N\)"):
        deploy.hf_generate(model, prompt[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        deploy.greedy_decode(ours, prompt, max_new_tokens=0)


def test_kv_cache_bytes_equal_the_cache_transformers_keeps():
    model = deploy.random_llama(num_layers=3, seed=0, **TINY_LLAMA)
    config = model.config
    with torch.no_grad():
        cache = model(torch.ones(2, 7, dtype=torch.long), use_cache=True).past_key_values
    stored = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert stored == deploy.kv_cache_bytes(
        num_layers=3,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        seq_len=7,
        batch=2,
    )
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, float32: 46,080 bytes per token
    per_token = deploy.kv_cache_bytes(num_layers=30, num_kv_heads=3, head_dim=64, seq_len=1)
    assert per_token == 46_080


def test_smollm2_file_is_hash_checked(monkeypatch):
    from mmcourse import pretrained

    monkeypatch.setattr(pretrained, "sha256_file", lambda _: "0" * 64)
    with pytest.raises(pretrained.ModelFileError, match="corrupted or not the official one"):
        deploy.load_smollm2()


# --- export: ONNX and checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    tokenizer = WordTokenizer.from_texts(["a red circle", "a blue square on the left"])
    model = TinyClip(
        TinyClipConfig(
            vocab_size=len(tokenizer),
            embed_dim=8,
            vision_dim=8,
            text_dim=8,
            vision_layers=1,
            text_layers=1,
            vision_heads=2,
            text_heads=2,
        )
    ).eval()
    return model, tokenizer


@pytest.mark.slow
def test_onnx_towers_equal_pytorch(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    images = torch.rand(3, 3, 32, 32)
    image_path = deploy.export_onnx(
        deploy.ImageTower(model),
        (images,),
        tmp_path / "image.onnx",
        input_names=["images"],
        dynamic_axes={"images": {0: "batch"}},
    )
    text = tokenizer(["a red circle", "a blue square on the left"])
    text_path = deploy.export_onnx(
        deploy.TextTower(model),
        (text["input_ids"], text["attention_mask"]),
        tmp_path / "text.onnx",
        input_names=["input_ids", "attention_mask"],
        dynamic_axes={n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask")},
    )
    other_images = torch.rand(5, 3, 32, 32)  # another batch size: the batch axis is dynamic
    got = deploy.run_onnx(deploy.onnx_session(image_path, threads=1), {"images": other_images})
    with torch.no_grad():
        expected = model.encode_image(other_images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    other_text = tokenizer(["a circle", "red", "a blue circle on the left square"])
    got = deploy.run_onnx(deploy.onnx_session(text_path), dict(other_text))
    with torch.no_grad():
        expected = model.encode_text(other_text)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    int8_path = deploy.quantize_onnx_int8(image_path, tmp_path / "image.int8.onnx")
    assert int8_path.stat().st_size < image_path.stat().st_size
    got = deploy.run_onnx(deploy.onnx_session(int8_path), {"images": other_images})
    assert got.shape == (5, 8) and torch.isfinite(got).all()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        deploy.export_onnx(deploy.ImageTower(model), (images,), image_path, input_names=["images"])
    with pytest.raises(ValueError, match="inputs"):
        deploy.run_onnx(deploy.onnx_session(image_path), {"pixels": images})


def test_checkpoints_round_trip_and_refuse_to_overwrite(tiny_clip, tmp_path):
    model, _ = tiny_clip
    tied = nn.Linear(4, 4)
    state = {**model.state_dict(), "tied.a": tied.weight, "tied.b": tied.weight}
    rows = deploy.checkpoint_load_times(state, tmp_path, repeats=1)
    assert [r["format"] for r in rows] == ["safetensors", "torch.save"]
    assert all(r["bytes"] > 0 and r["load_ms"] > 0 for r in rows)
    with pytest.raises(FileExistsError, match="empty folder"):
        deploy.checkpoint_load_times(state, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        deploy.checkpoint_load_times(state, tmp_path / "missing")


# --- the explorer -------------------------------------------------------------------------


def test_explorer_draws_a_point_of_the_sweep_headless():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    before = plt.get_fignums()
    rows = deploy.sweep(
        {"float32 eager": lambda x: x * 2, "int8 torchao": lambda x: x + 1},
        torch.zeros,
        [1, 8],
        repeats=2,
    )
    fig = Figure(figsize=(8, 3))
    for batch, candidate in [(1, "float32 eager"), (8, "int8 torchao"), (1, "int8 torchao")]:
        deploy.draw_sweep_point(fig, table=rows, batch=batch, candidate=candidate)
        assert len(fig.axes) == 2
        assert fig.axes[0].get_title() == f"{candidate}, B = {batch}"
        row = next(r for r in rows if r["candidate"] == candidate and r["batch_size"] == batch)
        heights = [p.get_height() for p in fig.axes[0].patches]
        assert heights == pytest.approx([row["p50_ms"], row["p95_ms"]])
        assert "x float32 eager" in fig.axes[1].get_title()
    with pytest.raises(ValueError, match=r"no row for candidate 'bf16' at batch size 1.*\[1, 8\]"):
        deploy.draw_sweep_point(fig, table=rows, batch=1, candidate="bf16")
    with pytest.raises(ValueError, match="at batch size 4"):
        deploy.draw_sweep_point(fig, table=rows, batch=4, candidate="int8 torchao")
    assert plt.get_fignums() == before


def test_importing_torchao_after_mmcourse_prints_no_cpu_notices():
    code = "import mmcourse, torchao.quantization, transformers; transformers.BertConfig()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for notice in mmcourse._ImportNotices.NOTICES:
        assert notice not in done.stderr, done.stderr
