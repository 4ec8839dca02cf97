"""Shared test setup: no network, deterministic threads, helpers to make small real videos."""
import os

import pytest

# Model weights cannot come from a hub here (and a silent offline CLIP tokenizer is a known trap).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def no_network(monkeypatch) -> None:
    """Every socket connection fails loudly: a test of an offline path proves it never tried the network."""
    import socket

    def refuse(self, address, *args):
        raise AssertionError(f"a network connection was attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="session")
def slurm_demo(tmp_path_factory):
    """The demo data for the Slurm tests of both clusters, made once per session by the documented commands."""
    from slurmtest import make_demo

    return make_demo(tmp_path_factory.mktemp("slurm-demo"))
