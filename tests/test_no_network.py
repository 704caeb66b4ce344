"""The suite itself is offline: conftest's guard refuses connections beyond this machine."""
import socket

import pytest


def test_connections_beyond_loopback_fail():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        with pytest.raises(RuntimeError, match="tests must not use the network"):
            s.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed


def test_loopback_stays_allowed():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.connect(server.getsockname())
