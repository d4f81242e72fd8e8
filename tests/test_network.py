"""The suite runs offline: network access fails, in this process and in mmcourse's guard."""

import socket

import pytest

from mmcourse import offline


def test_pytest_blocks_non_local_connections():
    from pytest_socket import SocketConnectBlockedError

    with pytest.raises(SocketConnectBlockedError, match="198.51.100.7"):
        socket.create_connection(("198.51.100.7", 80), timeout=1)


def test_mmcourse_guard_refuses_remote_and_allows_loopback():
    import os

    assert os.environ["MMCOURSE_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    offline.install()
    try:
        sock = socket.socket()
        with pytest.raises(offline.NetworkAccessError, match="MMCOURSE_OFFLINE"):
            offline._guarded(offline._original_connect)(sock, ("198.51.100.7", 80))
        sock.close()
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.socket()
        client.connect(server.getsockname())  # loopback is fine (notebook kernels use it)
        client.close()
        server.close()
    finally:
        offline.uninstall()
