"""A guard that makes any network access fail loudly (used by the test suite).

The course runs offline: nothing may download weights or data at run time. Tests set
``MMCOURSE_OFFLINE=1``; importing :mod:`mmcourse` then installs this guard in the process
(notebook kernels included), so a hidden download raises instead of silently working.
"""

from __future__ import annotations

import ipaddress
import socket

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
                f"network access to {address!r} attempted while MMCOURSE_OFFLINE=1: the course "
                "must run offline (no downloads at run time)"
            )
        return original(self, address)

    return connect


def install() -> None:
    """Refuse every socket connection that does not go to this machine."""
    socket.socket.connect = _guarded(_original_connect)
    socket.socket.connect_ex = _guarded(_original_connect_ex)


def uninstall() -> None:
    socket.socket.connect = _original_connect
    socket.socket.connect_ex = _original_connect_ex
