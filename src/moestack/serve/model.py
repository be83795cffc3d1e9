"""The model the engine runs: a decoder of moestack modules over a paged KV cache.

One class serves moestack runs (`top2`, `shared_top1`, `scmoe`) and the Hugging Face MoE families
(serve/loader.py maps their weights in by name, as vLLM does): GQA attention with a fused qkv projection,
optional qkv bias, per-head or whole-projection q/k RMSNorm, RoPE from precomputed tables, and FFNs that
are moestack `MoELayer`s (so DualSparse, traces and load statistics work as on the training model) or
dense SwiGLUs. Module names match `models.transformer.MoETransformer`, so a run's state_dict loads as is.
Tokens are flat: a step is T new tokens of B sequences; `forward(idx)` runs whole sequences without a
cache (calibration, tests).
Notation: T = tokens, D = d_model, H / Hkv = query / key-value heads, hd = head size, E = experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moestack.models.transformer import RMSNorm
from moestack.moe.dispatch import Done
from moestack.moe.experts import SwiGLU, fused_inference, sm_count
from moestack.moe.fused import few_rows_fit, few_rows_linear, few_rows_splits
from moestack.moe.layer import MoELayer
from moestack.serve.attention import AttnMeta, attend, attend_dense, write_kv

QK_NORMS = ("none", "head", "full")


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a servable model (what loader.py reads from a run's config or an HF config.json)."""

    family: str  # moestack | mixtral | qwen2_moe | qwen3_moe | olmoe
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_len: int  # positions with RoPE tables (the longest sequence served)
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"  # none | head (Qwen3: RMSNorm over each head) | full (OLMoE: over the whole projection)
    clip_qkv: float | None = None
    tie_embeddings: bool = False
    scmoe: bool = False  # ScMoE blocks (moestack arch scmoe)
    scmoe_position: str = "prev_attn"
    eos_token_ids: tuple[int, ...] = field(default=())


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, hd] by per-token tables cos/sin [T, hd/2] (halves layout, as Llama/HF)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def post_qkv(qkv: torch.Tensor, cos, sin, H: int, Hkv: int, hd: int, qk_norm: str, norms, clip):
    """The fused qkv projection's output [T, (H + 2 Hkv) hd] -> q [T, H, hd], k, v [T, Hkv, hd]: split, q/k
    RMSNorm (whole projection or per head), clipping, RoPE. Elementwise only: on the GPU the runner compiles it
    into a few fused kernels (`compile_elementwise`)."""
    T = qkv.shape[0]
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    if qk_norm == "full":
        q, k = F.rms_norm(q, (H * hd,), norms[0], norms[2]), F.rms_norm(k, (Hkv * hd,), norms[1], norms[2])
    if clip is not None:
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    q, k, v = q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)
    if qk_norm == "head":
        q, k = F.rms_norm(q, (hd,), norms[0], norms[2]), F.rms_norm(k, (hd,), norms[1], norms[2])
    return rope_rotate(q, cos, sin), rope_rotate(k, cos, sin), v


POST_QKV = [post_qkv]  # [0] is what PagedAttention calls on CUDA: post_qkv, or its compiled form


def compile_elementwise() -> None:
    """Compile the serving step's q/k norm + RoPE with torch.compile where the one-kernel tail
    (serve/qkv_triton.py) does not apply (steps attended through the reference path on CUDA); the runner calls
    this on CUDA before capturing graphs; the eager function stays the reference on CPU."""
    # One graph per (model shape, dtype, batch 1 or more): a process that serves several models in turn (tests,
    # benches) would pass dynamo's default limit of 8 per function; past the limit, dynamo runs the eager
    # function (no fullgraph), so a limit reached costs speed, never an error. vLLM raises the limit likewise.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if POST_QKV[0] is post_qkv:
        POST_QKV[0] = torch.compile(post_qkv, dynamic=True)


class PagedAttention(nn.Module):
    """GQA self-attention writing to and reading from one layer's paged KV cache."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        H, Hkv, hd, D = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, hd
        self.qkv = nn.Linear(D, (H + 2 * Hkv) * hd, bias=spec.qkv_bias)  # rows: q, then k, then v
        self.out = nn.Linear(H * hd, D, bias=spec.out_bias)
        self.qk_norm, self.clip = spec.qk_norm, spec.clip_qkv
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, spec.norm_eps), RMSNorm(hd, spec.norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * hd, spec.norm_eps), RMSNorm(Hkv * hd, spec.norm_eps)

    def out_summands(self, o: torch.Tensor) -> torch.Tensor:
        """The out projection of o [T, H hd]: a decode batch (T <= fused.BLOCK_M) in bf16 / fp16 where the Triton
        kernels run gives split-K fp32 partial products [T, S, D] whose sum is the projection, for the residual
        add after it to sum (`add_norm`); else out(o) [T, D]. cuBLAS took a split-K GEMM and a reduce kernel for
        it at batch 8 (8.5 + 1.7 us at Qwen3-30B-A3B's 16.8 MB, H100, profile_decode 2026-12-07)."""
        w = self.out.weight
        splits = few_rows_splits(*w.shape, sm_count(o)) if self.out.bias is None and few_rows_fit(o, w) else 1
        return few_rows_linear(o, w, splits).transpose(0, 1) if splits > 1 else self.out(o)

    def norms(self):
        """(q norm weight, k norm weight, eps), or None without q/k norms: what post_qkv and its kernel take."""
        return (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm != "none" else None

    def project(self, x, cos, sin):
        """x [T, D] -> q [T, H, hd], k, v [T, Hkv, hd] (q/k norms and RoPE applied)."""
        post = POST_QKV[0] if x.is_cuda else post_qkv
        return post(self.qkv(x), cos, sin, self.n_heads, self.n_kv_heads, self.head_dim, self.qk_norm, self.norms(),
                    self.clip)

    def forward(self, x, cos, sin, kv, meta, summands: bool = False) -> torch.Tensor:
        # x: [T, D]; cos/sin: [T, hd/2]; kv: (k_cache, v_cache) or None (meta = the batch size, whole sequences)
        if kv is not None and (meta.decode or meta.prefill):  # the Triton attention kernels read the cache:
            from moestack.serve.qkv_triton import qkv_rope_write  # norms, RoPE and the cache stores in one kernel

            q = qkv_rope_write(self.qkv(x), cos, sin, self.n_heads, self.n_kv_heads, self.head_dim, self.qk_norm,
                               self.norms(), self.clip, kv[0], kv[1], meta.slots)
            o = attend(q, None, None, kv, meta)
        else:
            q, k, v = self.project(x, cos, sin)
            if kv is None:
                o = attend_dense(q, k, v, meta)
            else:
                write_kv(kv[0], kv[1], k, v, meta.slots)
                o = attend(q, k, v, kv, meta)
        o = o.reshape(x.shape[0], -1)
        return self.out_summands(o) if summands else self.out(o)


def ffn_out(ffn: nn.Module, x: torch.Tensor, summands: bool = False) -> torch.Tensor:
    """A block's FFN on flat tokens [T, D]: an MoELayer (routed + shared experts) or a dense SwiGLU. summands:
    an MoE's output may be its choice rows [T, k, D] unsummed, for `add_norm` to sum."""
    if isinstance(ffn, MoELayer):
        return ffn.output(x, summed=not summands)  # no loss to add up
    return ffn(x)


def addend(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A residual addend as rows [T, D] of dtype: y itself, or for a stack y [T, S, D] (a sublayer's output left
    unsummed, `summands=True`) its sum in fp32 rounded to dtype, as its producer's sum kernel would store it."""
    return y if y.dim() == 2 else y.float().sum(dim=1).to(dtype)


def add_norm(h: torch.Tensor, y: torch.Tensor | None, norm: RMSNorm, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + y, norm(h + y)), or (h, norm(h)) for y None; y may be a stack of rows to sum (`addend`). fused (the
    serving steps on CUDA): one Triton kernel (serve/norm_triton.py) where no gradient is wanted."""
    if fused and h.is_cuda and (y is None or h.dtype == y.dtype or y.dim() == 3) and fused_inference(
            *(t for t in (h, y, norm.weight) if t is not None)):
        from moestack.serve.norm_triton import add_rms_norm

        return add_rms_norm(h, y, norm.weight, norm.eps)
    h = h if y is None else h + addend(y, h.dtype)
    return h, norm(h)


class ServeBlock(nn.Module):
    """Pre-norm block: h + attn(norm1(h)), then + ffn(norm2(.))."""

    def __init__(self, spec: ModelSpec, ffn: nn.Module):
        super().__init__()
        self.norm1, self.attn = RMSNorm(spec.d_model, spec.norm_eps), PagedAttention(spec)
        self.norm2, self.ffn = RMSNorm(spec.d_model, spec.norm_eps), ffn

    def forward(self, h, cos, sin, kv, meta):
        h, y = self.step(h, None, cos, sin, kv, meta)
        return h + y

    def step(self, h, pending, cos, sin, kv, meta, fused: bool = False):
        """The block on h + pending (the previous block's FFN output, None for none): (the residual stream after
        the attention, this block's FFN output), so each residual add fuses with the norm after it (`add_norm`).
        fused: the adds and norms as Triton kernels, which also sum the sublayers' unsummed outputs (stacks of
        rows: the out projection's split-K partials, the MoE's choice rows), so those sums cost no kernel."""
        h, x = add_norm(h, pending, self.norm1, fused)
        h, x = add_norm(h, self.attn(x, cos, sin, kv, meta, summands=fused), self.norm2, fused)
        return h, ffn_out(self.ffn, x, summands=fused)


class ServeScMoEBlock(nn.Module):
    """ScMoE block (models/transformer.py's ScMoEBlock over the paged cache): shared expert on this block's
    state, top-1 MoE on the shortcut state; driven in phases by `ServeModel._scmoe`."""

    def __init__(self, spec: ModelSpec, shared: SwiGLU, moe: MoELayer):
        super().__init__()
        d = spec.d_model
        self.norm1, self.attn = RMSNorm(d, spec.norm_eps), PagedAttention(spec)
        self.norm2, self.shared = RMSNorm(d, spec.norm_eps), shared
        self.norm_moe, self.moe = RMSNorm(d, spec.norm_eps), moe

    def start_moe(self, src: torch.Tensor):
        """Route the shortcut state [T, D] and start its experts: a handle whose wait() gives [T, D]."""
        flat = self.norm_moe(src)
        routing = self.moe.route(flat)
        fused = self.moe.fused(flat, routing)
        if fused is not None:
            return Done(fused)
        return _Compute(self.moe, self.moe.dispatch(flat, routing))


class _Compute:
    """Run an MoE layer's experts on a dispatch handle when waited on, then wait for the combine."""

    def __init__(self, moe: MoELayer, handle):
        self.moe, self.handle, self.combined = moe, handle, None

    def launch(self):
        if self.combined is None:
            self.combined = self.moe.compute(self.handle)
        return self

    def wait(self):
        return self.launch().combined.wait()


class ServeModel(nn.Module):
    """Embedding, blocks, final norm and LM head over a paged KV cache; see the module docstring."""

    def __init__(self, spec: ModelSpec, blocks: list[nn.Module], inv_freq: torch.Tensor, rope_scale: float = 1.0):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        angles = torch.outer(torch.arange(spec.max_len, dtype=torch.float32, device="cpu"), inv_freq.float().cpu())  # [S, hd/2]
        self.register_buffer("rope_cos", angles.cos() * rope_scale, persistent=False)
        self.register_buffer("rope_sin", angles.sin() * rope_scale, persistent=False)
        self._moe_layers = [m for m in self.modules() if isinstance(m, MoELayer)]
        self.flow = None  # expert-parallel token-follows-expert flow (serve/follow.py) when set
        self.fused_norms = False  # residual adds fused with their norms (Triton; the runner sets it on CUDA)

    def moe_layers(self) -> list[MoELayer]:
        return list(self._moe_layers)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, kv_caches, meta,
               rows: torch.Tensor | None = None, normed: bool = False) -> torch.Tensor:
        """Final hidden states [T, D] of a step's new tokens [T] at `positions` [T] (kv_caches per block, or
        None with meta = batch size for whole causal sequences); only the rows `rows` [N] when given ([N, D]).
        normed: after the final norm (what `lm_head` reads), the last residual add fused with it."""
        if self.flow is not None:
            h = self.flow.hidden(self, tokens, positions, kv_caches, meta, rows)
            return self.norm(h) if normed else h
        valid = getattr(meta, "valid", None)  # a captured step's padding rows: DualSparse's batch drops skip them
        for layer in self._moe_layers:
            if hasattr(layer.dispatcher, "valid"):
                layer.dispatcher.valid = valid
        h = self.embed.weight[tokens]  # = embed(tokens); on CUDA a gather kernel (index_select's took 7.5 us at batch 8)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        caches = kv_caches if kv_caches is not None else [None] * len(self.blocks)
        if self.spec.scmoe:
            h = self._scmoe(h, cos, sin, caches, meta)
        else:
            pending = None
            for block, kv in zip(self.blocks, caches):
                h, pending = block.step(h, pending, cos, sin, kv, meta, self.fused_norms)
            if normed and rows is None:
                return add_norm(h, pending, self.norm, self.fused_norms)[1]
            h = h if pending is None else h + addend(pending, h.dtype)
        h = h if rows is None else h.index_select(0, rows)
        return self.norm(h) if normed else h

    def _scmoe(self, h, cos, sin, caches, meta):
        """The ScMoE schedule of models/transformer.py: each MoE starts as soon as its input exists."""
        blocks, from_input = self.blocks, self.spec.scmoe_position == "block_input"
        pending = None
        for i, (blk, kv) in enumerate(zip(blocks, caches)):
            if from_input:
                pending = blk.start_moe(h)
            a = h + blk.attn(blk.norm1(h), cos, sin, kv, meta)
            if pending is None:
                pending = blk.start_moe(a)
            nxt = blocks[i + 1].start_moe(a) if not from_input and i + 1 < len(blocks) else None
            if isinstance(pending, _Compute):
                pending.launch()  # experts, then the combine is in flight ...
            s = blk.shared(blk.norm2(a))  # ... while the shared expert computes
            h = a + s + pending.wait()
            pending = nxt
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, V] in fp32."""
        return self.head(self.norm(h)).float()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head of final-normed rows x [N, D]: [N, V] in the model's dtype. A decode batch (N <=
        fused.BLOCK_M) in bf16 / fp16 where the Triton kernels run takes `fused.few_rows_linear` (read once, in
        place: faster than cuBLAS at these shapes, measured in bench/decode_pieces.py)."""
        w = self.lm_head.weight
        if few_rows_fit(x, w):
            return few_rows_linear(x, w)
        return self.lm_head(x)

    def routing_snapshot(self) -> list[torch.Tensor]:
        """What `expert_loads` reads of the last step, per MoE layer: its expert ids [T, k] (its counts [E] under
        the follow flow). A CUDA graph keeps these tensors and rewrites them each replay, so it returns them
        and the loads are counted only when someone asks."""
        if self.flow is not None:  # each layer routed this rank's share of the tokens
            return [layer.last_routing.counts for layer in self._moe_layers]
        return [layer.last_routing.expert_ids for layer in self._moe_layers]

    def expert_loads(self, valid: torch.Tensor | None = None,
                     snapshot: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token-choices per expert in the last step (or in `snapshot`, a `routing_snapshot`), per MoE layer:
        [L_moe, E] int64 (rows where valid [T] is 0, a graph's padding, excluded)."""
        layers = self._moe_layers
        snapshot = self.routing_snapshot() if snapshot is None else snapshot
        if not layers:
            return torch.zeros(0, 0, dtype=torch.int64)
        if self.flow is not None:
            return torch.stack(snapshot)
        E = max(layer.num_experts for layer in layers)
        ids = torch.stack(snapshot)  # [L, T, k]: one scatter for all
        ids = ids + torch.arange(len(layers), device=ids.device).view(-1, 1, 1) * E
        ones = torch.ones_like(ids) if valid is None else valid.to(ids.dtype).view(1, -1, 1).expand_as(ids)
        loads = torch.zeros(len(layers) * E, dtype=torch.int64, device=ids.device)
        return loads.scatter_add_(0, ids.flatten(), ones.flatten()).view(len(layers), E)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Whole sequences without a cache: idx [B, S] -> logits [B, S, V] (calibration and tests)."""
        B, S = idx.shape
        positions = torch.arange(S, device=idx.device).repeat(B)
        h = self.hidden(idx.reshape(-1), positions, None, B)
        return self.logits(h).view(B, S, -1)
