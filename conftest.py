"""Test-wide settings: strictly offline, quiet, deterministic."""

import os

# Set before anything imports transformers/datasets; inherited by notebook kernels too.
os.environ["HF_HUB_OFFLINE"] = "1"  # unconditionally: an exported 0 must not survive
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MMCOURSE_OFFLINE"] = "1"  # mmcourse refuses network access in every process
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a GPU and `espeak` tests without espeak-ng."""
    import shutil

    has_gpu = torch.cuda.is_available() or (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    )
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA or MPS device"))
        if item.get_closest_marker("espeak") and shutil.which("espeak-ng") is None:
            item.add_marker(pytest.mark.skip(reason="needs espeak-ng (apt-get install espeak-ng)"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module on one torch thread, then restore the setting.

    The models in most tests are tiny: on a busy 2-core machine, two threads that wait on
    each other made them 3-50x slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
