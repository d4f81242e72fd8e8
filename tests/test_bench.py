"""``python -m mmcourse.bench clip`` runs with tiny sizes and prints both of its tables.

(The ``attention`` benchmark is tested in tests/test_attention.py.)
"""

import pytest

from mmcourse import bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["clip", "--device", "cpu", "--batch-sizes", "4", "16", "--embed-dim", "8"]
TINY += ["--repeats", "1", "--min-block", "0.0001", "--train-batch", "4", "--width", "8"]
TINY += ["--layers", "1", "--heads", "2", "--projection-dim", "8", "--vocab-size", "10"]
TINY += ["--text-length", "5", "--warmup-steps", "1", "--train-repeats", "1"]


def test_clip_benchmark_prints_its_tables(capsys):
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("4 ", "16 "))]
    assert [r[0] for r in rows] == ["4", "16"] and all(len(r) == 4 for r in rows)
    assert all(float(r[3]) > 0 for r in rows)  # the time ratio
    assert "ours (TinyClip)" in out and "transformers CLIPModel" in out
    assert "throughput ratio ours / transformers" in out


def test_clip_benchmark_rejects_bad_sizes(capsys):
    assert bench.main([*TINY, "--heads", "3"]) == 2
    assert "heads=3 must divide width=8" in capsys.readouterr().err
    assert bench.main(["clip", "--batch-sizes", "0"]) == 2
    assert "batch_size must be a positive integer" in capsys.readouterr().err


def test_the_loss_timing_checks_both_losses_agree():
    rows = bench.clip_loss_timings([3], embed_dim=4, repeats=1, device="cpu", min_block_s=1e-4)
    assert rows[0].batch == 3 and rows[0].ratio > 0


GENERATE = ["generate", "--device", "cpu", "--new-tokens", "4", "--prompt-length", "3"]
GENERATE += ["--repeats", "1", "--hidden", "8", "--layers", "1", "--heads", "2"]
GENERATE += ["--vocab-size", "16"]


def test_generate_benchmark_prints_its_table(capsys):
    assert bench.main(GENERATE) == 0
    out = capsys.readouterr().out
    assert "the same tokens from ours and transformers" in out
    for name in ("ours, KV cache", "transformers generate", "ours, no cache"):
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert float(row.split()[-1]) > 0  # tokens/s
    assert "ratio ours / transformers" in out and "speed-up from the KV cache" in out
    row = next(line for line in out.splitlines() if line.startswith("ours, from-scratch"))
    assert float(row.split()[-1]) > 0  # chapter 11's decoder on the same weights
    assert "ratio from-scratch decoder / transformers" in out
    assert bench.main([*GENERATE, "--no-recompute", "--no-scratch", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "ours, no cache" not in out and "from-scratch" not in out


def test_generate_benchmark_rejects_bad_sizes(capsys):
    assert bench.main([*GENERATE, "--heads", "3"]) == 2
    assert "heads=3 must divide hidden=8" in capsys.readouterr().err
    assert bench.main([*GENERATE, "--new-tokens", "0"]) == 2
    assert "new_tokens must be a positive integer" in capsys.readouterr().err


DEPLOY = ["deploy", "--threads", "1", "--widths", "8", "--repeats", "1", "--no-compile"]
DEPLOY += ["--llm-layers", "1", "--llm-hidden", "36", "--new-tokens", "3", "--requests", "4"]
DEPLOY += ["--concurrency", "2"]


def test_deploy_benchmark_prints_its_ratios(capsys):
    assert bench.main(DEPLOY) == 0
    out = capsys.readouterr().out
    assert "float32 / int8" in out and "torch.compile: skipped" in out
    int8_rows = [
        line.split() for line in out.splitlines() if line.startswith(("torchao", "torch.ao"))
    ]
    assert len(int8_rows) == 3 * 2 and all(float(r[-1]) > 0 for r in int8_rows)  # 3 versions x 2 B
    for name in ("kv_cache_speedup", "dynamic_batching_throughput_ratio"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert float(line.split()[1]) > 0


def test_deploy_benchmark_rejects_bad_sizes(capsys):
    assert bench.main([*DEPLOY, "--llm-hidden", "10"]) == 2
    assert "multiple of SmolLM2's 9 heads" in capsys.readouterr().err
