"""The training state as a flat dict of tensors, the form checkpoints store.

Keys: `model.<param>` for weights and persistent buffers, `optim.<param>.<moment>` for AdamW state,
`rng.torch` (and `rng.cuda`), `stats.tokens_seen` [L, E]. Expert-stacked tensors (dim 0 = local expert
slot) are described by an `ExpertShard` so checkpoints can save, place and reshard single experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moestack.checkpoint import CheckpointError, ExpertShard
from moestack.moe.experts import GroupedExperts


def expert_param_names(model: nn.Module) -> dict[str, tuple[int, tuple[int, ...]]]:
    """`name -> (moe layer index, global expert ids of the slots)` for every expert-stacked parameter."""
    out = {}
    layer = 0
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for pname, _ in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{pname}"] = (layer, tuple(mod.global_ids))
            layer += 1
    return out


def flatten_state(model: nn.Module, optimizer: torch.optim.Optimizer, tokens_seen: torch.Tensor):
    """(tensors, experts): the model, AdamW moments, RNG and routing statistics as flat tensors."""
    experts_by_param = expert_param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    experts: dict[str, ExpertShard] = {}
    for name, t in model.state_dict().items():
        tensors[f"model.{name}"] = t.detach()
        if name in experts_by_param:
            experts[f"model.{name}"] = ExpertShard(*experts_by_param[name])
    names = {p: n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        for moment, value in st.items():
            key = f"optim.{names[p]}.{moment}"
            tensors[key] = value.detach() if torch.is_tensor(value) else torch.tensor(value)
            if names[p] in experts_by_param and tensors[key].dim() > 0:
                experts[key] = ExpertShard(*experts_by_param[names[p]])
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors["stats.tokens_seen"] = tokens_seen.detach().cpu()
    return tensors, experts


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Load flat tensors back into the model and optimizer; returns the saved tokens_seen [L, E]."""
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_sd, strict=True)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    expected = {f"optim.{names[id(p)]}.{m}" for p, st in optimizer.state.items() for m in st}
    missing = expected - set(tensors)
    if missing:
        raise CheckpointError(f"the checkpoint lacks optimizer state {sorted(missing)[:3]}...; it does not match this model")
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        pname, moment = key[len("optim."):].rsplit(".", 1)
        if pname not in params:
            raise CheckpointError(f"the checkpoint holds optimizer state for {pname!r}, which this model lacks")
        p = params[pname]
        optimizer.state[p][moment] = value.to(p.device) if moment != "step" else value.clone()
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return tensors["stats.tokens_seen"]

