"""A decoder-only MoE transformer: RMSNorm, RoPE, causal SDPA attention, MoE FFNs.

Block wiring lives in `build_blocks`; the three architectures (see docs/methods/scmoe.md):
- `top2`: the standard block, FFN = top-k MoE (k = moe.top_k).
- `shared_top1`: FFN = shared dense expert + top-1 MoE, both on the block's post-attention state.
- `scmoe`: shared expert on the post-attention state, top-1 MoE on an earlier state reached through a
  shortcut, so its dispatch can run while this block's attention and shared expert compute.
Notation: B = batch, S = sequence, D = d_model, H = heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moestack.config import Config
from moestack.moe.experts import SwiGLU
from moestack.moe.layer import MoELayer


class RMSNorm(nn.Module):
    """Root-mean-square layer norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings: each [S, head_dim/2]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, S, hd]; rotate pairs (first half, second half) as in Llama/Mixtral
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention through F.scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3x [B,H,S,hd]
        q, k = apply_rope(q, cos[:S], sin[:S]), apply_rope(k, cos[:S], sin[:S])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
        return self.out(y.transpose(1, 2).reshape(B, S, D))


def make_moe(cfg: Config, top_k: int, shared: int) -> MoELayer:
    """An MoE layer from the config with the given top-k and number of shared experts."""
    m = cfg.moe
    return MoELayer(
        cfg.model.d_model, m.num_experts, top_k, m.d_ff,
        renormalize=m.renormalize, aux_loss_coef=m.aux_loss_coef, z_loss_coef=m.z_loss_coef,
        bias_balancing=m.bias_balancing, capacity_factor=m.capacity_factor,
        shared_experts=shared, impl=m.impl,
    )


class Block(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then + ffn(norm(.)); the FFN is dense or an MoE layer."""

    def __init__(self, cfg: Config, ffn: nn.Module):
        super().__init__()
        d = cfg.model.d_model
        self.norm1, self.attn = RMSNorm(d, cfg.model.norm_eps), Attention(d, cfg.model.n_heads)
        self.norm2, self.ffn = RMSNorm(d, cfg.model.norm_eps), ffn

    def forward(self, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + self.attn(self.norm1(h), cos, sin)
        out = self.ffn(self.norm2(h))
        if isinstance(out, tuple):
            return h + out[0], out[1]
        return h + out, h.new_zeros(())


class ScMoEBlock(nn.Module):
    """ScMoE block: shared expert on this block's state, top-1 MoE on a shortcut state.

    The model drives it in phases (`attend`, `start_moe`, `finish_moe`, `shared_out`) so that the MoE's
    dispatch and combine can be in flight while attention and the shared expert compute.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.model.d_model
        self.norm1, self.attn = RMSNorm(d, cfg.model.norm_eps), Attention(d, cfg.model.n_heads)
        self.norm2, self.shared = RMSNorm(d, cfg.model.norm_eps), SwiGLU(d, cfg.moe.d_ff)
        self.norm_moe, self.moe = RMSNorm(d, cfg.model.norm_eps), make_moe(cfg, top_k=1, shared=0)

    def attend(self, h, cos, sin):
        return h + self.attn(self.norm1(h), cos, sin)

    def start_moe(self, src: torch.Tensor):
        """Route the shortcut state [B, S, D] and launch its dispatch: (handle, aux loss)."""
        flat = self.norm_moe(src).reshape(-1, src.shape[-1])
        routing = self.moe.route(flat)
        return self.moe.dispatch(flat, routing), routing.aux_loss + routing.z_loss

    def shared_out(self, a: torch.Tensor) -> torch.Tensor:
        return self.shared(self.norm2(a))


def build_blocks(cfg: Config) -> nn.ModuleList:
    """The one place where block types are chosen."""
    m, e = cfg.model, cfg.moe
    if m.arch == "scmoe":
        return nn.ModuleList(ScMoEBlock(cfg) for _ in range(m.n_layers))
    top_k, shared = (e.top_k, e.shared_experts) if m.arch == "top2" else (1, 1)
    dense_ff = m.dense_d_ff or 2 * e.d_ff
    blocks = []
    for i in range(m.n_layers):
        is_moe = i >= m.dense_first and (i - m.dense_first) % m.moe_every == 0
        ffn = make_moe(cfg, top_k, shared) if is_moe else SwiGLU(m.d_model, dense_ff)
        blocks.append(Block(cfg, ffn))
    return nn.ModuleList(blocks)


class MoETransformer(nn.Module):
    """Decoder-only MoE language model. forward(idx [B, S], targets) -> (logits, loss, aux)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = build_blocks(cfg)
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(m.seq_len, m.d_model // m.n_heads, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.overlap = True  # ScMoE: keep communication in flight across compute (off = wait at once)
        self.apply(_init_weights)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in network order."""
        return [mod for mod in self.modules() if isinstance(mod, MoELayer)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.forward_embeds(self.embed(idx), targets)

    def forward_embeds(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        """The blocks and head on input embeddings h [B, S, D] (models/vlm.py puts image tokens there);
        targets of -100 are ignored."""
        cos, sin = self.rope_cos, self.rope_sin
        if self.cfg.model.arch == "scmoe":
            h, aux = self._scmoe_blocks(h, cos, sin)
        else:
            aux = h.new_zeros(())
            for block in self.blocks:
                h, a = block(h, cos, sin)
                aux = aux + a
        logits = self.lm_head(self.norm(h))  # [B, S, V]
        if targets is None:
            return logits, None, aux
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss, aux

    def _scmoe_blocks(self, h, cos, sin):
        """ScMoE schedule: each MoE's dispatch is launched as early as its input exists."""
        blocks, from_input = self.blocks, self.cfg.model.scmoe_position == "block_input"
        aux, pending = h.new_zeros(()), None
        for i, blk in enumerate(blocks):
            if from_input:
                pending = self._launch(blk, h)
            a = blk.attend(h, cos, sin)  # overlaps a dispatch launched from h or from the last block
            if pending is None:  # first block under prev_attn: no earlier state exists, use its own
                pending = self._launch(blk, a)
            handle, moe_aux = pending
            # Under prev_attn the next block's dispatch starts now, before this block's experts: launching
            # a dispatch exchanges row counts (a blocking collective and a host copy on the EP group), which
            # would otherwise sit between this block's combine and its shared expert and serialise them.
            nxt = self._launch(blocks[i + 1], a) if not from_input and i + 1 < len(blocks) else None
            combined = self._settle(blk.moe.compute(handle))  # experts, then the combine is in flight ...
            s = blk.shared_out(a)  # ... while the shared expert computes
            h = a + s + combined.wait().view_as(a)
            aux = aux + moe_aux
            pending = nxt
        return h, aux

    def _launch(self, blk: ScMoEBlock, src):
        handle, aux = blk.start_moe(src)
        return self._settle(handle), aux

    def _settle(self, handle):
        """With overlap off, complete a communication handle right away (the sequential schedule)."""
        if not self.overlap:
            handle.wait()
        return handle

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample continuation tokens for idx [B, S] by full recompute (the reference the serving engine is tested against)."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.model.seq_len:]
            logits = self(ctx)[0][:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def _init_weights(mod: nn.Module) -> None:
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        nn.init.normal_(mod.weight, std=0.02)
