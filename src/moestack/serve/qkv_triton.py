"""The attention projection's tail as one Triton kernel: q/k RMSNorm, clipping, RoPE, and the new keys and
values stored in the paged cache.

Eagerly that is `model.post_qkv` then `attention.write_kv`. In a batch-8 decode step at OLMoE's shapes on an
H100 (`bash bench/suite.sh profile_decode`, 2026-12-07) the compiled post_qkv took 2 x 10.7 us per layer
(Inductor's looped reductions of the whole-projection norm over 2048 columns, for 8 rows) and write_kv two
index_copy kernels of 2.8 us: 27 us per layer, more than the layer's attention. Here one program per (token,
q | k | v) loads its row as [heads, hd / 2] halves, norms it (over the whole projection or per head, in fp32,
rounded to the model's dtype as `F.rms_norm` returns it), clips, rotates, and stores q to a new tensor and k,
v straight to their cache slots. The serving step takes it wherever the cache is read by the Triton attention
kernels (decode and paged prefill: CUDA); the eager functions stay the reference (tests pin them equal).
Notation: T = tokens, H / Hkv = query / key-value heads, hd = head size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NORMS = {"none": 0, "full": 1, "head": 2}


@triton.jit
def _qkv_rope_write(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slots_ptr, q_ptr, kc_ptr, vc_ptr,
                    stride_t, stride_cs, stride_qt, stride_slot, eps, clip,
                    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr, NORM: tl.constexpr, CLIP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: q, 1: k, 2: v
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    if which == 0:
        heads = H
        col0 = 0
    elif which == 1:
        heads = HKV
        col0 = H * 2 * HALF
    else:
        heads = HKV
        col0 = (H + HKV) * 2 * HALF
    m = (h < heads)[:, None] & (d < HALF)[None, :]
    off = h[:, None] * (2 * HALF) + d[None, :]  # [BLOCK_H, BLOCK_D]: first halves; + HALF: second halves
    base = qkv_ptr + t * stride_t + col0
    x1 = tl.load(base + off, mask=m, other=0.0)
    x2 = tl.load(base + off + HALF, mask=m, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if which < 2:
        if NORM == 1:  # over the whole projection (OLMoE), before the clip as in post_qkv
            if which == 0:
                w_ptr = qw_ptr
            else:
                w_ptr = kw_ptr
            ss = tl.sum(tl.sum(x1 * x1 + x2 * x2, axis=1), axis=0)
            r = tl.rsqrt(ss / (heads * 2 * HALF) + eps)
            w1 = tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + off + HALF, mask=m, other=0.0).to(tl.float32)
            x1 = (x1 * r * w1).to(dtype).to(tl.float32)
            x2 = (x2 * r * w2).to(dtype).to(tl.float32)
    if CLIP:
        x1 = tl.minimum(tl.maximum(x1, -clip), clip)
        x2 = tl.minimum(tl.maximum(x2, -clip), clip)
    if which < 2:
        if NORM == 2:  # per head (Qwen3), after the clip as in post_qkv
            if which == 0:
                w_ptr = qw_ptr
            else:
                w_ptr = kw_ptr
            r = tl.rsqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / (2 * HALF) + eps)  # [BLOCK_H]
            w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
            x1 = (x1 * r[:, None] * w1).to(dtype).to(tl.float32)
            x2 = (x2 * r[:, None] * w2).to(dtype).to(tl.float32)
    if which < 2:  # RoPE, halves layout
        c = tl.load(cos_ptr + t * stride_cs + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_cs + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        x1 = y1
        x2 = y2
    if which == 0:
        out = q_ptr + t * stride_qt + off
    else:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if which == 1:
            out = kc_ptr + slot * stride_slot + off
        else:
            out = vc_ptr + slot * stride_slot + off
    tl.store(out, x1.to(out.dtype.element_ty), mask=m)
    tl.store(out + HALF, x2.to(out.dtype.element_ty), mask=m)


def qkv_rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, Hkv: int, hd: int, qk_norm: str,
                   norms, clip: float | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
    """`post_qkv` + `write_kv` in one kernel: qkv [T, (H + 2 Hkv) hd] -> q [T, H, hd]; k and v are stored at their
    cache slots [T] of k/v_cache [blocks, page, Hkv, hd]. cos/sin [T, hd / 2]; norms (q weight, k weight, eps)
    or None; clip: the clamp of q, k, v or None."""
    T = qkv.shape[0]
    if hd % 2 or qkv.shape[1] != (H + 2 * Hkv) * hd:
        raise ValueError(f"qkv_rope_write: qkv {tuple(qkv.shape)} is not [T, (H + 2 Hkv) hd] for H={H}, Hkv={Hkv}, "
                         f"hd={hd} (even)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[2:] != (Hkv, hd):
        raise ValueError(f"qkv_rope_write needs contiguous [blocks, page, {Hkv}, {hd}] caches, got "
                         f"{tuple(k_cache.shape)}")
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q = qkv.new_empty(T, H, hd)
    if T == 0:
        return q
    qw, kw, eps = norms if norms is not None else (qkv, qkv, 0.0)
    _qkv_rope_write[(T, 3)](qkv, cos, sin, qw, kw, slots, q, k_cache, v_cache,
                            qkv.stride(0), cos.stride(0), q.stride(0), k_cache.stride(1), float(eps),
                            float(clip or 0.0), H=H, HKV=Hkv, HALF=hd // 2,
                            BLOCK_H=triton.next_power_of_2(max(H, Hkv)), BLOCK_D=triton.next_power_of_2(hd // 2),
                            NORM=NORMS[qk_norm], CLIP=clip is not None)
    return q
