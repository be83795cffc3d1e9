"""Run a function on N real processes joined by gloo (the multi-rank test harness)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    fn(rank, world, *args)
    # Leave every group a test joined (train() joins an existing world and keeps the groups it made):
    # a gloo group still alive at interpreter exit can abort the process ("terminate called without an
    # active exception") while its worker threads are torn down.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Spawn `world` processes running fn(rank, world, *args); raises if any of them fails."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
