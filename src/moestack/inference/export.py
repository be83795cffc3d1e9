"""A sparsified moestack model on disk: safetensors weights + JSON description, never a pickle.

Folder layout:
    config.toml        the run's model config (copied from the run folder)
    model.safetensors  every weight and DualSparse calibration tensor (experts in part layout, scales, score tables)
    sparse.json        {"format": "moestack.sparse/v2", "parts", "method", "drop_rate", ..., "report": {...}}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from moestack.config import load_config
from moestack.inference.dualsparse import dispatchers, install, moe_layers, set_drop_rate
from moestack.models.transformer import MoETransformer

FORMAT = "moestack.sparse/v2"  # v1 stored E*P sub-experts; v2 stores E experts in `PartExperts` layout


def save_sparse(model: MoETransformer, run_dir: str | Path, out_dir: str | Path, spec: dict) -> Path:
    """Write a sparsified MoETransformer of the run `run_dir` to `out_dir`; `spec` holds parts, method, drop_rate."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(run_dir) / "config.toml", out / "config.toml")
    save_model(model, str(out / "model.safetensors"))  # de-duplicates the tied embedding / LM head
    (out / "sparse.json").write_text(json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")
    return out


def read_spec(out_dir: str | Path) -> dict:
    """The sparse.json of a saved sparse model, checked for its format."""
    path = Path(out_dir) / "sparse.json"
    if not path.is_file():
        raise ValueError(f"{out_dir} is not a sparsified model folder (no sparse.json); "
                         "write one with `moestack sparsify`")
    spec = json.loads(path.read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r} is not {FORMAT!r}; "
                         "write the folder again with this version's `moestack sparsify`")
    return spec


def load_sparse(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[MoETransformer, dict]:
    """(model in eval mode with the saved drop policy, spec) from a folder written by `save_sparse`."""
    out = Path(out_dir)
    spec = read_spec(out)
    model = MoETransformer(load_config(out / "config.toml"))
    for layer in moe_layers(model):
        install(layer, spec["parts"])
    load_model(model, str(out / "model.safetensors"), strict=True)
    for disp in dispatchers(model):
        disp.set_ranks(disp.expert_rank.tolist())
    set_drop_rate(model, spec["drop_rate"], spec.get("load_aware", False), spec.get("max_rank_rate"))
    return model.to(device).eval(), spec
