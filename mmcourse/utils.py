"""Device choice, seeding and parameter checks shared by every chapter.

Taught in notebooks/00_setup_and_tour.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def get_device(device: str | torch.device = "auto") -> torch.device:
    """Pick the device to compute on.

    Args:
        device: ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or ``"mps"``.

    Returns:
        The ``torch.device``.

    Raises:
        ValueError: the name is not a device name, or that device is not available here.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES[1:]:
        raise ValueError(f"device must be one of {DEVICES} (or 'cuda:N'), got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device='auto' or 'cpu'"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    if kind == "mps" and not _mps_available():
        raise ValueError(
            f"device {device!r} was asked for but MPS is not available on this machine; "
            "use device='auto' or 'cpu'"
        )
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) so that a run repeats exactly.

    Args:
        seed: an integer in 0..2**64 - 1 (torch's seeds are 64 bits).

    Returns:
        A ``torch.Generator`` seeded with ``seed``, for code that wants its own stream.
    """
    non_negative_int(seed=seed)
    if seed >= 2**64:
        raise ValueError(f"seed must be an integer in 0..2**64 - 1 (64 bits), got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed % 2**32)  # Python refuses a larger one at start-up
    return torch.Generator().manual_seed(seed)


# --- parameter checks: used by every chapter's first cells and by the package ---------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(**values: Any) -> None:
    """Raise ``ValueError`` naming the parameter unless each value is an int > 0."""
    for name, value in values.items():
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(**values: Any) -> None:
    """Raise ``ValueError`` naming the parameter unless each value is an int >= 0."""
    for name, value in values.items():
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def positive_float(**values: Any) -> None:
    """Raise ``ValueError`` naming the parameter unless each value is a finite number > 0."""
    for name, value in values.items():
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if not ok or not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def fraction(**values: Any) -> None:
    """Raise ``ValueError`` naming the parameter unless each value lies in [0, 1]."""
    for name, value in values.items():
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if not ok or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def one_of(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
