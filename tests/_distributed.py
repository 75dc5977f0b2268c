"""What the tests that start process groups share: a free port, and a one-rank gloo group."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_rank_group() -> Iterator[None]:
    """A one-rank gloo process group in this process, for as long as the generator runs."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()
