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
    assert bench.main([*GENERATE, "--no-recompute", "--batch", "2"]) == 0
    assert "ours, no cache" not in capsys.readouterr().out


def test_generate_benchmark_rejects_bad_sizes(capsys):
    assert bench.main([*GENERATE, "--heads", "3"]) == 2
    assert "heads=3 must divide hidden=8" in capsys.readouterr().err
    assert bench.main([*GENERATE, "--new-tokens", "0"]) == 2
    assert "new_tokens must be a positive integer" in capsys.readouterr().err
