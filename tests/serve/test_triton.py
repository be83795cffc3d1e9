"""The serving kernels against their eager references: Triton paged decode attention vs attend_ref,
fused MoE (gather prologue, weighted epilogue, DualSparse parts) vs a loop, and the engine with both on
(on a GPU compiled, on the CPU under Triton's interpreter)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.serve.helpers import hf_folder

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("page, H, Hkv, hd", [(4, 4, 2, 8), (16, 4, 4, 16), (3, 8, 2, 8)])
def test_paged_decode_matches_sdpa(triton_device, page, H, Hkv, hd):
    attn = importlib.import_module("moestack.serve.attention_triton")
    g = torch.Generator().manual_seed(0)
    B, NB = 3, 12
    kc, vc = (torch.randn(NB, page, Hkv, hd, generator=g).to(triton_device) for _ in range(2))
    q = torch.randn(B, H, hd, generator=g).to(triton_device)
    lens = torch.tensor([1, 2 * page + 1, 5 * page], dtype=torch.int32)
    tables = torch.stack([torch.randperm(NB, generator=g)[:6] for _ in range(B)]).to(torch.int32)
    out = attn.paged_decode(q, kc, vc, tables.to(triton_device), lens.to(triton_device))
    for b in range(B):
        pos = torch.arange(int(lens[b]))
        rows = tables[b, pos // page].long().to(triton_device), (pos % page).to(triton_device)
        k, v = kc[rows].transpose(0, 1), vc[rows].transpose(0, 1)  # [Hkv, L, hd]
        ref = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
        assert torch.allclose(out[b], ref, atol=1e-5), b


@pytest.mark.parametrize("T, E, k, parts, drop", [(5, 8, 2, 1, False), (40, 8, 2, 2, True), (3, 16, 4, 2, False)])
def test_fused_experts_match_a_loop(triton_device, T, E, k, parts, drop):
    fused = importlib.import_module("moestack.moe.fused")
    importlib.import_module("moestack.moe.fused_triton")
    g = torch.Generator().manual_seed(1)
    D, F2 = 32, 32
    f = F2 // parts
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, D, 2 * F2, generator=g) / 4, torch.randn(E, F2, D, generator=g) / 4
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    run = torch.randint(0, parts + 1, (T, k), generator=g) if drop else None
    dev = triton_device
    y = fused.fused_experts(x.to(dev), ids.to(dev), w.to(dev), w13.to(dev), w2.to(dev), parts,
                            None if run is None else run.to(dev)).cpu()
    ref = torch.zeros(T, D)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            for p in range(parts if run is None else int(run[t, j])):
                gate, up = (x[t] @ w13[e][:, p * 2 * f:(p + 1) * 2 * f]).chunk(2)
                ref[t] += w[t, j] * ((F.silu(gate) * up) @ w2[e][p * f:(p + 1) * f])
    assert torch.allclose(y, ref, atol=1e-4)


def test_engine_with_the_fused_kernels_equals_the_eager_engine(triton_device, tmp_path):
    from moestack.serve import LLM, SamplingParams

    importlib.import_module("moestack.moe.fused_triton")
    hf_folder(tmp_path, "qwen3_moe")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [[2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3], [11] * 6]
    eager = LLM(str(tmp_path), device=triton_device, dtype="float32", block_size=4, num_blocks=64, fused_rows=0,
                cuda_graphs=False)
    ref = eager.generate(prompts, params, use_tqdm=False)
    fast = LLM(str(tmp_path), device=triton_device, dtype="float32", block_size=4, num_blocks=64, fused_rows=1024)
    calls = []
    real = fast.model.moe_layers()[0].fused

    def spy(x, routing):
        y = real(x, routing)
        calls.append(y is not None)
        return y

    fast.model.moe_layers()[0].fused = spy
    got = fast.generate(prompts, params, use_tqdm=False)
    assert calls and all(calls)  # every step of that layer went through the fused kernels
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
