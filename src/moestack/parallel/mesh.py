"""Process groups for dp x ep from torchrun's environment, carried by one DeviceMesh.

Ranks are laid out (dp, ep) with ep innermost, so an EP group is a run of neighbouring ranks (one
node's GPUs under torchrun). No module reaches for the default group: everything takes a group from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from moestack.config import ConfigError, ParallelConfig


@dataclass
class ParallelContext:
    """Who this process is and the groups it talks through (all None in a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ep: int = 1
    dp: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh
    ep_group: object = None
    dp_group: object = None
    grad_group: object = None  # the whole world, for replicated gradients (DDP)
    stats_group: object = None  # the whole world, for router statistics in the forward pass
    owns_world: bool = False  # this context joined the process group, so it leaves it

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def batch_rows(self, global_batch: int) -> slice:
        """This rank's rows of the global batch (which must split evenly over the ranks)."""
        if global_batch % self.world:
            raise ConfigError(
                f"train.batch_size={global_batch} (the global batch) does not split over {self.world} ranks; "
                f"use a multiple of {self.world}"
            )
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} (--device, train.device) but no CUDA device is available; use --device cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    if name.startswith("cuda:"):
        if world_from_env()[1] > 1:
            raise ConfigError(f"train.device={name!r} under torchrun would put every rank on one GPU; use --device cuda "
                              "(each rank takes the GPU of its LOCAL_RANK) and CUDA_VISIBLE_DEVICES to pick GPUs")
        index = int(name.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_sizes(cfg: ParallelConfig, world: int, num_experts: int = 0) -> tuple[int, int]:
    """(dp, ep) for this world, or a ConfigError saying what divides what.

    ep = 0 (auto): a placement file's GPU count; else with dp given ep = world // dp; else the largest
    number that divides the world, num_experts and the ranks of one node (torchrun's LOCAL_WORLD_SIZE), so
    every rank holds experts where it can and the all-to-all stays inside a node. dp covers the rest.
    """
    if cfg.mode == "fssdp" and cfg.ep == 0:  # FSSDP shards whole experts over any number of ranks
        if cfg.dp and world % cfg.dp:
            raise ConfigError(f"--dp {cfg.dp} does not divide the world size {world}; launch a multiple of {cfg.dp} ranks")
        cfg = replace(cfg, ep=world // (cfg.dp or 1))
    if cfg.ep == 0 and world == 1:
        cfg = replace(cfg, ep=1)  # one process: nothing to split
    if cfg.ep == 0 and cfg.placement:
        from moestack.placement.placement import Placement

        gpus = Placement.load(cfg.placement).num_gpus
        if world % gpus:
            raise ConfigError(f"{cfg.placement} places the experts on {gpus} GPUs but torchrun started {world} ranks; "
                              f"launch a multiple of {gpus} ranks (or pass --ep and a placement made for it)")
        cfg = replace(cfg, ep=gpus)
    if cfg.ep == 0:
        if num_experts <= 0:
            raise ValueError("resolve_sizes: parallel.ep = 0 (auto) needs the model's num_experts")
        if cfg.dp:
            if world % cfg.dp:
                raise ConfigError(f"--dp {cfg.dp} does not divide the world size {world}; launch a multiple of {cfg.dp} ranks")
            ep = world // cfg.dp
            if num_experts % ep:
                raise ConfigError(
                    f"--dp {cfg.dp} on {world} ranks leaves ep = {ep}, which does not divide the {num_experts} experts; "
                    f"pass --ep with a divisor of {num_experts} (and of {world})"
                )
            return cfg.dp, ep
        node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        ep = max(d for d in range(1, world + 1) if world % d == 0 and num_experts % d == 0 and node % d == 0)
        return world // ep, ep
    if world % cfg.ep:
        raise ConfigError(f"--ep {cfg.ep} does not divide the world size {world}; launch a multiple of {cfg.ep} ranks")
    dp = cfg.dp or world // cfg.ep
    if dp * cfg.ep != world:
        raise ConfigError(f"--dp {dp} x --ep {cfg.ep} = {dp * cfg.ep} but torchrun started {world} ranks; make dp * ep = world")
    return dp, cfg.ep


def init_parallel(cfg: ParallelConfig, device: str = "auto", num_experts: int = 0) -> ParallelContext:
    """Join torchrun's world (NCCL on GPU, gloo on CPU) and build the (dp, ep) mesh (num_experts: for ep auto)."""
    rank, world, local_rank = world_from_env()
    dp, ep = resolve_sizes(cfg, world, num_experts)
    dev = pick_device(device, local_rank)
    if world == 1:
        return ParallelContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    # Two whole-world groups on purpose: DDP all-reduces gradient buckets on grad_group from its own hooks
    # while autograd runs the router statistics' all-reduce backward on stats_group; on one communicator the
    # two streams of collectives could be issued in different orders on different ranks (NCCL deadlocks).
    grad_group = dist.new_group(list(range(world)))
    stats_group = dist.new_group(list(range(world)))
    return ParallelContext(
        rank, world, local_rank, ep, dp, dev, mesh,
        mesh.get_group("ep"), mesh.get_group("dp"), grad_group, stats_group, owns,
    )


def shutdown(ctx: ParallelContext) -> None:
    """Leave the process group if this context joined it (a no-op in one process)."""
    if ctx.owns_world and dist.is_initialized():
        dist.destroy_process_group()
