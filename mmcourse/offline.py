"""A guard that makes any network access fail loudly (used by the test suite).

The course runs offline: nothing may download weights or data at run time. Tests set
``MMCOURSE_OFFLINE=1``; importing :mod:`mmcourse` then installs this guard in the process
(notebook kernels included), so a hidden download raises instead of silently working.
While the guard is on, the Hugging Face offline variables (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) are set to ``1`` whatever they were
(an exported ``0`` does not survive); :func:`uninstall` restores them.
"""

from __future__ import annotations

import ipaddress
import os
import socket

HF_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
OFFLINE_MESSAGE = "network access is disabled while the course runs (MMCOURSE_OFFLINE=1)"
_saved_environment: dict[str, str | None] = {}

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


class NetworkAccessError(RuntimeError):
    """Raised when code tries to reach the network while the offline guard is on."""


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded(original):
    def connect(self, address):
        if not _is_local(address):
            raise NetworkAccessError(
                f"{OFFLINE_MESSAGE}: a connection to {address!r} was refused (the course "
                "must run offline, with no downloads at run time)"
            )
        return original(self, address)

    return connect


def is_installed() -> bool:
    """True while the guard refuses network connections in this process."""
    return socket.socket.connect is not _original_connect


def network_disabled() -> bool:
    """True if this process must not reach the network: the guard is on, or
    ``MMCOURSE_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` is set."""
    return (
        is_installed()
        or os.environ.get("MMCOURSE_OFFLINE") == "1"
        or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    )


def install() -> None:
    """Refuse every socket connection that does not go to this machine, and set the
    Hugging Face offline variables to ``1`` (unconditionally, restored by :func:`uninstall`)."""
    _saved_environment.clear()
    _saved_environment.update({name: os.environ.get(name) for name in HF_OFFLINE_VARIABLES})
    for name in HF_OFFLINE_VARIABLES:
        os.environ[name] = "1"
    socket.socket.connect = _guarded(_original_connect)
    socket.socket.connect_ex = _guarded(_original_connect_ex)


def uninstall() -> None:
    """Allow network connections again and restore the Hugging Face offline variables."""
    socket.socket.connect = _original_connect
    socket.socket.connect_ex = _original_connect_ex
    for name, value in _saved_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_environment.clear()
