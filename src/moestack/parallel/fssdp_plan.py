"""Hecate's plans (arXiv 2502.02581): who owns each expert, and which extra copies to materialize.

Pure functions of expert loads, shared by the training runtime (parallel/fssdp.py) and the step-time
simulation (bench/fssdp_sim.py), so both plan identically. Every rank runs them on the same all-reduced
loads and gets the same answer, so no plan is ever sent.

Notation: L = MoE layers, E = experts per layer, G = devices (ranks of the sharding group).
- Heterogeneous sharding: whole experts are the unit; every device holds the same number of expert slots
  over all layers, ceil(L * E / G) at most (memory balanced), but any number of one layer's experts.
- Materialization: for one step and layer, each device may hold up to `budget` copies of experts it does not
  own; tokens are spread evenly over an expert's holders, so a device's expected load is
  sum over held e of load[e] / holders(e).
"""

from __future__ import annotations

import math

import numpy as np


def heterogeneous_sharding(loads: np.ndarray, devices: int) -> np.ndarray:
    """owner [L, E] of every expert, from loads [L, E] (token-choices; uniform loads give a round robin).

    The paper's greedy: layers in order of their hottest expert, a layer's experts hottest first, each onto
    the device with the least load in that layer that still has a free slot (ties: fewer slots used, then
    the lower rank). Hot experts of a layer land on different devices; cold ones fill the remaining slots.
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2:
        raise ValueError(f"heterogeneous_sharding: loads must be [layers, experts], got shape {loads.shape}")
    if devices < 1:
        raise ValueError(f"heterogeneous_sharding: devices must be >= 1, got {devices}")
    L, E = loads.shape
    capacity = math.ceil(L * E / devices)
    used = np.zeros(devices, dtype=np.int64)
    owner = np.full((L, E), -1, dtype=np.int64)
    for layer in sorted(range(L), key=lambda l: (-loads[l].max(), l)):
        layer_load = np.zeros(devices)
        for e in sorted(range(E), key=lambda e: (-loads[layer, e], e)):
            free = [d for d in range(devices) if used[d] < capacity]
            d = min(free, key=lambda d: (layer_load[d], used[d], d))
            owner[layer, e] = d
            used[d] += 1
            layer_load[d] += loads[layer, e]
    return owner


def device_loads(loads: np.ndarray, owner: np.ndarray, replicas: list[list[int]], devices: int) -> np.ndarray:
    """Expected token-choices per device [G] for one layer: each expert's load split evenly over its holders."""
    holders = holders_of(owner, replicas)
    out = np.zeros(devices)
    for e, hs in enumerate(holders):
        for d in hs:
            out[d] += loads[e] / len(hs)
    return out


def holders_of(owner: np.ndarray, replicas: list[list[int]]) -> list[list[int]]:
    """Devices holding each expert for a step: its owner first, then the devices with a copy, ascending."""
    holders = [[int(o)] for o in owner]
    for d, experts in enumerate(replicas):
        for e in experts:
            holders[e].append(d)
    return [[h[0]] + sorted(h[1:]) for h in holders]


def materialize(loads: np.ndarray, owner: np.ndarray, devices: int, budget: int) -> list[list[int]]:
    """Extra copies per device for one layer: replicas[d] = experts (not owned by d) d materializes.

    Greedy on the predicted loads [E]: take the most loaded device and its largest share of one expert, give
    that expert a copy on the least loaded device with budget left that lacks it, while the copy leaves
    that device under the old maximum; at most `budget` copies per device. Ties break by the lower index, so every rank agrees.
    """
    loads = np.asarray(loads, dtype=np.float64)
    owner = np.asarray(owner, dtype=np.int64)
    replicas: list[list[int]] = [[] for _ in range(devices)]
    if budget <= 0 or devices == 1 or loads.sum() <= 0:
        return replicas
    holders = holders_of(owner, replicas)
    dev = device_loads(loads, owner, replicas, devices)
    for _ in range(budget * devices):
        hot = int(np.argmax(dev))
        best = None
        for e in sorted((e for e in range(len(loads)) if hot in holders[e]), key=lambda e: (-loads[e] / len(holders[e]), e)):
            free = [d for d in range(devices) if d not in holders[e] and len(replicas[d]) < budget]
            if not free:
                continue
            target = min(free, key=lambda d: (dev[d], d))
            trial = dev.copy()
            n = len(holders[e])
            for d in holders[e]:
                trial[d] -= loads[e] / n - loads[e] / (n + 1)
            trial[target] += loads[e] / (n + 1)
            # the hot device sheds load and the target stays under the old maximum: the maximum falls, or
            # fewer devices share it (plateaus of equal maxima are left one device at a time)
            if trial[hot] < dev[hot] - 1e-9 and trial[target] < dev.max() - 1e-9:
                best = (e, target, trial)
                break
        if best is None:
            break
        e, target, dev = best
        replicas[target].append(e)
        holders[e] = [holders[e][0]] + sorted(holders[e][1:] + [target])
    return [sorted(r) for r in replicas]


def balance(loads: np.ndarray) -> float:
    """max / mean of device loads (1.0 = balanced; 1.0 for no load)."""
    mean = float(np.mean(loads))
    return float(np.max(loads)) / mean if mean > 0 else 1.0
