from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


def load_golden(name: str):
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.skip(f"golden data {path} is absent (it ships only beside the project's own checkout)")
    return torch.load(path, weights_only=False)


def make_args(**overrides):
    """The parser's defaults plus overrides: the same path main.py and hubconf.py take."""
    from main import get_args_parser

    args = get_args_parser().parse_args([])
    args.device = "cpu"
    args.backbone_weights = "none"
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise AttributeError(f"make_args: unknown flag {k}")
        setattr(args, k, v)
    return args


def tiny_args(**overrides):
    """A tiny model for behaviour tests: resnet18, hidden 32, 1+2 layers, 5 queries, 4 classes."""
    base = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                num_queries=5, num_classes=4, dropout=0.0)
    base.update(overrides)
    return make_args(**base)


_ALLOWED_HOSTS = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test fails on a socket connection to anything but this machine (loopback and unix sockets)."""
    import socket

    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _ALLOWED_HOSTS:
            raise RuntimeError(f"a test tried to reach {address}: tests must not use the network")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
