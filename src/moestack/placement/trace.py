"""Routing traces: tokens per expert and expert-to-expert transitions between consecutive MoE layers.

Notation: L = MoE layers, E = experts per layer, k = top_k, T = tokens.
A token routed to experts A (|A| = k) in layer l and B (|B| = k) in layer l+1 adds one
token-choice pair (i, j) for every i in A and j in B, so k*k pairs per token and layer boundary.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class TraceError(ValueError):
    """A routing trace that is malformed or internally inconsistent."""


@dataclass
class RoutingTrace:
    """Routing statistics of a model on some tokens.

    ``counts[l, e]``: tokens routed to expert e in MoE layer l (int64 [L, E]).
    ``transitions[l, i, j]``: token-choice pairs routed to i in layer l and j in layer l+1 (int64 [L-1, E, E]).
    """

    counts: np.ndarray
    transitions: np.ndarray
    top_k: int

    @property
    def num_layers(self) -> int:
        """L, the number of MoE layers."""
        return int(self.counts.shape[0])

    @property
    def num_experts(self) -> int:
        """E, the number of experts per layer."""
        return int(self.counts.shape[1])

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens traced (counts of a layer sum to T * k)."""
        return int(self.counts[0].sum()) // self.top_k

    def validate(self, source: str = "trace") -> None:
        """Raise `TraceError` naming ``source`` and the field unless the trace is well formed.

        Checks: ``counts`` is 2-D [L, E] and ``transitions`` 3-D [L-1, E, E], both of an integer dtype
        and non-negative; ``1 <= top_k <= E``; each layer's counts sum to the same T*k; and for every
        boundary l, ``transitions[l].sum(axis=1) == k * counts[l]`` (each token on expert i pairs with its
        k experts of layer l+1) and ``transitions[l].sum(axis=0) == k * counts[l+1]``.
        """
        _check_arrays(self.counts, self.transitions, source)
        _check_top_k(self.top_k, self.num_experts, source)
        _check_consistency(self.counts, self.transitions, int(self.top_k), source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingTrace:
        """Read and validate an ``.npz`` trace with keys ``counts``, ``transitions``, ``top_k``."""
        name = str(path)
        if Path(path).is_file() and not zipfile.is_zipfile(path):
            raise TraceError(f"{name}: not an .npz archive; a trace is an .npz with counts, transitions, top_k")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("counts", "transitions", "top_k") if k not in data.files]
                if missing:
                    raise TraceError(f"{name}: missing key {missing[0]!r}; a trace has counts, transitions, top_k")
                counts, transitions, top_k = data["counts"], data["transitions"], data["top_k"]
        except FileNotFoundError:
            raise TraceError(f"{name}: file not found") from None
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            if isinstance(err, TraceError):
                raise
            raise TraceError(f"{name}: not a readable .npz trace ({err})") from None
        if top_k.shape != () or not np.issubdtype(top_k.dtype, np.integer):
            raise TraceError(f"{name}: 'top_k' must be one integer, got {top_k!r}")
        trace = cls(counts, transitions, int(top_k))
        trace.validate(name)
        return cls(counts.astype(np.int64), transitions.astype(np.int64), int(top_k))

    def save(self, path: str | os.PathLike) -> None:
        """Validate and write the ``.npz`` atomically."""
        self.validate(str(path))
        target = check_trace_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npz", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, counts=self.counts.astype(np.int64),
                         transitions=self.transitions.astype(np.int64), top_k=np.int64(self.top_k))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def check_trace_path(path: str | os.PathLike) -> Path:
    """`path` as a Path if a trace can be written there (not a folder), else a TraceError."""
    target = Path(path)
    if target.is_dir():
        raise TraceError(f"{target} is a folder; pass a file name for the trace, e.g. {target / 'trace.npz'}")
    return target


def _check_arrays(counts: np.ndarray, transitions: np.ndarray, name: str) -> None:
    for key, arr, dims in (("counts", counts, "[L, E]"), ("transitions", transitions, "[L-1, E, E]")):
        if not isinstance(arr, np.ndarray):
            raise TraceError(f"{name}: '{key}' must be a numpy array {dims}, got {type(arr).__name__}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TraceError(f"{name}: '{key}' has dtype {arr.dtype} but must be an integer dtype (int64)")
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise TraceError(f"{name}: 'counts' has shape {counts.shape} but must be 2-D [L, E] with L, E >= 1")
    L, E = counts.shape
    if transitions.shape != (L - 1, E, E):
        raise TraceError(
            f"{name}: 'transitions' has shape {transitions.shape} but must be [L-1, E, E] = {(L - 1, E, E)} "
            f"to match 'counts' {counts.shape}"
        )
    for key, arr in (("counts", counts), ("transitions", transitions)):
        if arr.size and arr.min() < 0:
            where = tuple(int(i) for i in np.argwhere(arr < 0)[0])
            raise TraceError(f"{name}: '{key}' has a negative entry {int(arr[where])} at {where}; counts are >= 0")


def _check_top_k(top_k: object, E: int, name: str) -> None:
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise TraceError(f"{name}: 'top_k' is {top_k!r} but must be an integer in 1..{E} (E={E})")


def _check_consistency(counts: np.ndarray, transitions: np.ndarray, k: int, name: str) -> None:
    totals = counts.sum(axis=1)  # [L]
    if totals[0] == 0:
        raise TraceError(f"{name}: 'counts' sum to 0: the trace holds no tokens; record one over some tokens")
    for layer, total in enumerate(totals):
        if total % k or total != totals[0]:
            raise TraceError(
                f"{name}: 'counts' of layer {layer} sum to {int(total)} but every layer must sum to "
                f"the same T*top_k ({int(totals[0])} in layer 0, top_k={k})"
            )
    for layer in range(transitions.shape[0]):
        _check_boundary(counts, transitions, k, layer, name)


def _check_boundary(counts: np.ndarray, transitions: np.ndarray, k: int, layer: int, name: str) -> None:
    rows = transitions[layer].sum(axis=1)  # [E]: pairs leaving each expert of layer l
    cols = transitions[layer].sum(axis=0)  # [E]: pairs entering each expert of layer l+1
    for side, got, want, at in (("row", rows, counts[layer], layer), ("column", cols, counts[layer + 1], layer + 1)):
        bad = np.flatnonzero(got != k * want)
        if bad.size:
            e = int(bad[0])
            raise TraceError(
                f"{name}: 'transitions'[{layer}] {side} sum for expert {e} is {int(got[e])} but must be "
                f"top_k * counts[{at}, {e}] = {k} * {int(want[e])} = {k * int(want[e])} "
                "(counts and transitions disagree)"
            )


def pair_counts(prev_ids: np.ndarray, cur_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Token-choice pair counts ``[E, E]`` between two layers' expert ids ``[T, k]`` of the same tokens."""
    E = num_experts
    pairs = prev_ids[:, :, None] * E + cur_ids[:, None, :]  # [T, k, k]
    return np.bincount(pairs.ravel(), minlength=E * E).reshape(E, E).astype(np.int64)


class TraceRecorder:
    """Accumulates a `RoutingTrace` from routing decisions.

    Call ``record(l, expert_ids)`` once per MoE layer per forward, in layer order 0..L-1, with the
    expert ids ``[T, k]`` of the same T tokens in every layer.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int | None = None):
        if num_layers < 1 or num_experts < 1:
            raise TraceError(f"TraceRecorder needs num_layers >= 1 and num_experts >= 1, got {num_layers}, {num_experts}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self._counts = np.zeros((num_layers, num_experts), dtype=np.int64)  # [L, E]
        self._transitions = np.zeros((num_layers - 1, num_experts, num_experts), dtype=np.int64)  # [L-1, E, E]
        self._prev: np.ndarray | None = None  # [T, k] ids of the last recorded layer in this forward
        self._next_layer = 0

    def record(self, layer_index: int, expert_ids: torch.Tensor | np.ndarray) -> None:
        """Add one MoE layer's routing decisions ``[T, k]`` for the current forward."""
        ids = self._as_ids(expert_ids)  # [T, k]
        if layer_index != self._next_layer:
            raise TraceError(
                f"TraceRecorder.record got layer {layer_index} but expected layer {self._next_layer}: "
                "call record once per MoE layer per forward, in layer order"
            )
        if layer_index > 0 and ids.shape[0] != self._prev.shape[0]:  # type: ignore[union-attr]
            raise TraceError(
                f"TraceRecorder.record: layer {layer_index} got {ids.shape[0]} tokens but layer "
                f"{layer_index - 1} got {self._prev.shape[0]}; every layer must see the same tokens"  # type: ignore[union-attr]
            )
        self._counts[layer_index] += np.bincount(ids.ravel(), minlength=self.num_experts)
        if layer_index > 0:
            self._transitions[layer_index - 1] += pair_counts(self._prev, ids, self.num_experts)  # type: ignore[arg-type]
        self._prev = ids
        self._next_layer = (layer_index + 1) % self.num_layers

    def _as_ids(self, expert_ids: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(expert_ids, torch.Tensor):
            expert_ids = expert_ids.detach().to("cpu").numpy()
        ids = np.asarray(expert_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(f"TraceRecorder.record expects integer expert ids [T, k], got {ids.dtype} {ids.shape}")
        if self.top_k is None:
            self.top_k = int(ids.shape[1])
        if ids.shape[1] != self.top_k:
            raise TraceError(f"TraceRecorder.record got top_k={ids.shape[1]} but the trace has top_k={self.top_k}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise TraceError(f"TraceRecorder.record got expert ids outside 0..{self.num_experts - 1}")
        return ids.astype(np.int64)

    def trace(self) -> RoutingTrace:
        """The trace of every complete forward recorded so far."""
        if self._next_layer != 0:
            raise TraceError(
                f"TraceRecorder.trace: the last forward stopped after layer {self._next_layer - 1} of "
                f"{self.num_layers}; record every MoE layer before asking for the trace"
            )
        if self.top_k is None:
            raise TraceError("TraceRecorder.trace: nothing was recorded")
        trace = RoutingTrace(self._counts.copy(), self._transitions.copy(), int(self.top_k))
        trace.validate("recorded trace")
        return trace


# --- Hugging Face MoE models -----------------------------------------------------------------------

# Router submodules of the supported families: Mixtral (v4: block_sparse_moe.gate, v5: mlp.gate),
# Qwen2-MoE, Qwen3-MoE and OLMoE (mlp.gate). Qwen2-MoE's mlp.shared_expert_gate does not match.
_HF_GATE_SUFFIXES = (".block_sparse_moe.gate", ".mlp.gate")


def hf_router_gates(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router gates of a Hugging Face MoE model, in layer order (dense layers have none)."""
    return [m for name, m in model.named_modules() if name.endswith(_HF_GATE_SUFFIXES)]


def _hf_top_k(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k < 1:
        raise TraceError("record_hf: the model's config has no num_experts_per_tok; is this an MoE model?")
    return top_k


def _hf_expert_ids(output: object, top_k: int) -> torch.Tensor:
    """Expert ids ``[T, k]`` from a gate's output.

    transformers v5 routers return ``(logits, scores, indices)``: take the model's own indices.
    v4 gates are ``nn.Linear`` returning logits ``[T, E]``: top-k of the softmax, as the MoE block does.
    """
    if isinstance(output, tuple):
        if len(output) == 3 and not output[2].is_floating_point():
            return output[2].reshape(-1, output[2].shape[-1])
        output = output[0]
    logits = output.reshape(-1, output.shape[-1])  # [T, E]
    return torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices  # [T, k]


def record_hf(model: torch.nn.Module, batches) -> RoutingTrace:
    """Run ``model`` on ``batches`` (input-id tensors ``[B, S]`` or dicts of model kwargs) and trace its routing.

    Hooks the router gates (see `hf_router_gates`); every token of every batch is counted,
    padding included, so pass unpadded batches for a clean trace.
    """
    gates = hf_router_gates(model)
    if not gates:
        raise TraceError(
            "record_hf: found no router gate (a module named '*.mlp.gate' or '*.block_sparse_moe.gate'); "
            "supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE"
        )
    top_k = _hf_top_k(model)
    num_experts = _hf_num_experts(model, gates[0])
    recorder = TraceRecorder(len(gates), num_experts, top_k)
    hooks = [
        gate.register_forward_hook(lambda _m, _in, out, layer=i: recorder.record(layer, _hf_expert_ids(out, top_k)))
        for i, gate in enumerate(gates)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, Mapping) else model(batch)  # BatchEncoding is a Mapping
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return recorder.trace()


def _hf_num_experts(model: torch.nn.Module, gate: torch.nn.Module) -> int:
    weight = getattr(gate, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])  # gates are Linear-shaped: [E, hidden]
    config = model.config
    for key in ("num_local_experts", "num_experts"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise TraceError("record_hf: cannot tell the number of experts from the gate or the config")
