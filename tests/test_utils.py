import numpy as np
import pytest
import torch

import mmcourse
from mmcourse import utils


def test_auto_device_is_available_here():
    device = mmcourse.get_device("auto")
    assert device.type in {"cpu", "cuda", "mps"}
    torch.zeros(2, device=device)  # usable


def test_cpu_and_device_objects():
    assert mmcourse.get_device("cpu") == torch.device("cpu")
    assert mmcourse.get_device(torch.device("cpu")) == torch.device("cpu")
    assert mmcourse.get_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "", 3, None])
def test_unknown_device_names_are_refused(bad):
    with pytest.raises(ValueError, match="device must be one of"):
        mmcourse.get_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        mmcourse.get_device("cuda")


@pytest.mark.skipif(
    getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    reason="this machine has MPS",
)
def test_unavailable_mps_is_a_clear_error():
    with pytest.raises(ValueError, match="MPS is not available"):
        mmcourse.get_device("mps")


@pytest.mark.gpu
def test_gpu_device_is_picked_by_auto():
    assert mmcourse.get_device("auto").type in {"cuda", "mps"}


def test_seed_everything_repeats_every_generator():
    def draw():
        return torch.rand(3), np.random.rand(3), __import__("random").random()

    mmcourse.seed_everything(7)
    a = draw()
    mmcourse.seed_everything(7)
    b = draw()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    mmcourse.seed_everything(8)
    assert not torch.equal(draw()[0], a[0])


def test_seed_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        mmcourse.seed_everything(-1)
    with pytest.raises(ValueError, match="seed"):
        mmcourse.seed_everything(1.5)


def test_parameter_checks_name_the_parameter():
    utils.positive_int(epochs=3, batch_size=np.int64(4))
    with pytest.raises(ValueError, match="epochs must be a positive integer, got -1"):
        utils.positive_int(epochs=-1)
    with pytest.raises(ValueError, match="steps"):
        utils.positive_int(steps=True)  # a bool is not a count
    with pytest.raises(ValueError, match="lr must be a positive number"):
        utils.positive_float(lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        utils.positive_float(lr=float("nan"))
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\]"):
        utils.fraction(dropout=1.5)
    with pytest.raises(ValueError, match="norm must be one of"):
        utils.one_of("norm", "mid", ["pre", "post"])
