"""The serving kernels against their eager references: Triton paged decode and prefill attention vs SDPA,
fused MoE (gather prologue, weighted epilogue, DualSparse parts) vs a loop, and the engine with both on
(on a GPU compiled, on the CPU under Triton's interpreter)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.serve.helpers import hf_folder

pytestmark = pytest.mark.triton
# bf16 against torch's rounding: on a GPU only (Triton's interpreter truncates fp32 to bf16)
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="bf16 rounding: GPU only"))


@pytest.mark.parametrize("block_n, splits", [(64, 1), (128, 1), (16, 4), (64, 2), (16, 8)])
@pytest.mark.parametrize("page, H, Hkv, hd", [(4, 4, 2, 8), (16, 4, 4, 16), (3, 8, 2, 8)])
def test_paged_decode_matches_sdpa(triton_device, page, H, Hkv, hd, block_n, splits):
    """Any key tile and split-KV (some splits empty at the short lengths) give SDPA's attention."""
    attn = importlib.import_module("moestack.serve.attention_triton")
    g = torch.Generator().manual_seed(0)
    B, NB = 3, 12
    kc, vc = (torch.randn(NB, page, Hkv, hd, generator=g).to(triton_device) for _ in range(2))
    q = torch.randn(B, H, hd, generator=g).to(triton_device)
    lens = torch.tensor([1, 2 * page + 1, 5 * page], dtype=torch.int32)
    tables = torch.stack([torch.randperm(NB, generator=g)[:6] for _ in range(B)]).to(torch.int32)
    out = attn.paged_decode(q, kc, vc, tables.to(triton_device), lens.to(triton_device), block_n=block_n,
                            splits=splits)
    for b in range(B):
        pos = torch.arange(int(lens[b]))
        rows = tables[b, pos // page].long().to(triton_device), (pos % page).to(triton_device)
        k, v = kc[rows].transpose(0, 1), vc[rows].transpose(0, 1)  # [Hkv, L, hd]
        ref = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
        assert torch.allclose(out[b], ref, atol=1e-5), b


def test_decode_tiles_split_few_pairs_and_widen_one_wave():
    from moestack.serve.attention_triton import decode_tiles

    assert decode_tiles(8, 4) == (8, 64)  # Qwen3-30B-A3B at batch 8: 32 pairs on 132 SMs
    assert decode_tiles(8, 8) == (4, 64)  # Mixtral: 64 pairs
    assert decode_tiles(8, 16) == (1, 128)  # OLMoE: 128 pairs, one wave
    assert decode_tiles(64, 16) == (1, 64) and decode_tiles(1, 1) == (8, 64) and decode_tiles(3, 2, sms=4) == (1, 64)


@pytest.mark.parametrize("qk_norm, clip, H, Hkv, hd", [("none", None, 4, 2, 8), ("full", None, 4, 2, 16),
                                                      ("head", None, 6, 2, 8), ("full", 0.5, 4, 4, 8),
                                                      ("head", 0.5, 4, 2, 12), ("none", 0.5, 3, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
def test_qkv_rope_write_equals_post_qkv_then_write_kv(triton_device, qk_norm, clip, H, Hkv, hd, dtype):
    """One kernel for q/k norm, clip, RoPE and the cache stores gives what the eager functions give (bf16: up to
    its rounding, on a GPU only: Triton's interpreter truncates to bf16 where torch rounds)."""
    qkv_triton = importlib.import_module("moestack.serve.qkv_triton")
    from moestack.serve.attention import write_kv
    from moestack.serve.model import post_qkv

    g = torch.Generator().manual_seed(1)
    T, blocks, page = 5, 6, 4
    rnd = lambda *s: torch.randn(*s, generator=g).to(triton_device, dtype)  # noqa: E731
    qkv = rnd(T, (H + 2 * Hkv) * hd)
    angles = rnd(T, hd // 2)
    cos, sin = angles.cos(), angles.sin()
    width = {"full": (H * hd, Hkv * hd), "head": (hd, hd)}.get(qk_norm)
    norms = (rnd(width[0]) + 1, rnd(width[1]) + 1, 1e-6) if width else None
    slots = torch.randperm(blocks * page, generator=g)[:T].to(triton_device)
    caches = [[torch.zeros(blocks, page, Hkv, hd, device=triton_device, dtype=dtype) for _ in range(2)] for _ in range(2)]
    q_ref, k, v = post_qkv(qkv, cos, sin, H, Hkv, hd, qk_norm, norms, clip)
    write_kv(*caches[0], k, v, slots)
    q = qkv_triton.qkv_rope_write(qkv, cos, sin, H, Hkv, hd, qk_norm, norms, clip, *caches[1], slots)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    for got, ref in zip(caches[1], caches[0]):
        torch.testing.assert_close(got.float(), ref.float(), **tol)
        assert ref.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
@pytest.mark.parametrize("T, D", [(3, 24), (8, 64), (1, 100)])
def test_add_rms_norm_equals_the_add_then_the_norm(triton_device, T, D, dtype):
    norm_triton = importlib.import_module("moestack.serve.norm_triton")
    g = torch.Generator().manual_seed(2)
    h, y, w = (torch.randn(*s, generator=g).to(triton_device, dtype) for s in ((T, D), (T, D), (D,)))
    total, out = norm_triton.add_rms_norm(h, y, w, 1e-6)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(total, h + y, **tol)
    torch.testing.assert_close(out.float(), F.rms_norm(h + y, (D,), w, 1e-6).float(), **tol)
    with pytest.raises(ValueError, match="one shape and dtype"):
        norm_triton.add_rms_norm(h, y[:, :-1], w, 1e-6)
    twice, _ = norm_triton.add_rms_norm(h, h, w, 1e-6)  # y is h: still an addend
    torch.testing.assert_close(twice, h + h, **tol)
    same, normed = norm_triton.add_rms_norm(h, None, w, 1e-6)  # no addend: the norm alone
    assert same is h
    torch.testing.assert_close(normed.float(), F.rms_norm(h, (D,), w, 1e-6).float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
@pytest.mark.parametrize("T, S, D, partials", [(3, 2, 24, True), (8, 8, 64, False), (1, 4, 100, True)])
def test_add_rms_norm_sums_a_stack_of_addends_first(triton_device, T, S, D, partials, dtype):
    """y a stack [T, S, D]: the MoE's choice rows (the stream's dtype, contiguous) or split-K partials (fp32,
    [S, T, D] transposed): summed in fp32 and rounded to h's dtype (`serve.model.addend`), then added."""
    from moestack.serve.model import addend

    norm_triton = importlib.import_module("moestack.serve.norm_triton")
    g = torch.Generator().manual_seed(S)
    h, w = torch.randn(T, D, generator=g).to(triton_device, dtype), torch.randn(D, generator=g).to(triton_device, dtype)
    y = (torch.randn(S, T, D, generator=g).to(triton_device).transpose(0, 1) if partials
         else torch.randn(T, S, D, generator=g).to(triton_device, dtype))
    total, out = norm_triton.add_rms_norm(h, y, w, 1e-6)
    want = h + addend(y, dtype)
    assert addend(y, dtype).shape == (T, D) and not torch.equal(want, h + y[:, 0])  # every row counts
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(total, want, **tol)
    torch.testing.assert_close(out.float(), F.rms_norm(want, (D,), w, 1e-6).float(), **tol)
    with pytest.raises(ValueError, match="stack"):
        norm_triton.add_rms_norm(h, y[:, :, :-1], w, 1e-6)


def test_out_summands_are_split_k_partials_of_the_out_projection(triton_device):
    """PagedAttention.out_summands: half-precision decode rows give [T, S, D] fp32 partials summing to out(o);
    fp32 rows or more than fused.BLOCK_M of them give out(o) itself."""
    from moestack.moe.experts import sm_count
    from moestack.serve.model import PagedAttention, addend

    importlib.import_module("moestack.moe.fused_triton")
    holder = torch.nn.Module()
    holder.out = torch.nn.Linear(1024, 32, bias=False).to(triton_device, torch.float16)
    o = torch.randn(5, 1024).to(triton_device, torch.float16)
    sms = sm_count(o)
    with torch.inference_mode():
        got = PagedAttention.out_summands(holder, o)
        want = holder.out(o)
        assert got.dim() == 3 and got.shape[::2] == (5, 32) and got.dtype == torch.float32
        assert got.shape[1] == (2 if sms == 4 else got.shape[1]) > 1
        torch.testing.assert_close(addend(got, torch.float16).float(), want.float(), atol=2e-2, rtol=1e-2)
        assert PagedAttention.out_summands(holder, torch.randn(17, 1024).to(triton_device, torch.float16)).dim() == 2
        holder.out.float()
        assert torch.equal(PagedAttention.out_summands(holder, o.float()), holder.out(o.float()))


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
@pytest.mark.parametrize("N, V, block", [(3, 1000, 128), (8, 5000, 4096), (1, 7, 4096)])
def test_argmax_rows_equals_torch_argmax(triton_device, N, V, block, dtype):
    """Chunked argmax: the first index of the largest value, ties and NaN as torch.argmax has them."""
    argmax_triton = importlib.import_module("moestack.serve.argmax_triton")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, V, generator=g)
    x[0, V // 2] = x[0, V - 1] = 50.0  # a tie across chunks: the first wins
    if N > 1:
        x[1, V // 3] = float("nan")
    x = x.to(triton_device, dtype)
    got = argmax_triton.argmax_rows(x, block=block)
    assert got.dtype == torch.int64
    assert got.tolist() == x.float().argmax(dim=-1).tolist()
    assert got[0].item() == V // 2
    with pytest.raises(ValueError, match="float rows"):
        argmax_triton.argmax_rows(x[0])


@pytest.mark.parametrize("T, k, D", [(3, 2, 24), (8, 8, 2048), (2, 1, 5)])
def test_sum_choices_equals_a_sum_over_each_tokens_rows(triton_device, T, k, D):
    fused_triton = importlib.import_module("moestack.moe.fused_triton")
    x = torch.randn(T * k, D, generator=torch.Generator().manual_seed(4)).to(triton_device)
    assert torch.allclose(fused_triton.sum_choices(x, k), x.view(T, k, D).sum(dim=1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, N, K", [(1, 70, 24), (8, 300, 64), (16, 33, 48)])
def test_few_rows_linear_equals_f_linear(triton_device, T, N, K, dtype):
    """The LM head's decode path: the fused MoE GEMM as one expert, w read in place ([N, K] through strides)."""
    fused = importlib.import_module("moestack.moe.fused")
    importlib.import_module("moestack.moe.fused_triton")
    g = torch.Generator().manual_seed(T)
    x, w = (torch.randn(*shape, generator=g).to(triton_device, dtype) for shape in ((T, K), (N, K)))
    got = fused.few_rows_linear(x, w)
    assert got.shape == (T, N) and got.dtype == dtype
    want = F.linear(x.float(), w.float())
    assert torch.allclose(got.float(), want, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-3)
    assert torch.equal(fused.few_rows_linear(x, w), got)  # the cached plan gives the same rows again
    with pytest.raises(ValueError, match="T <= 16"):
        fused.few_rows_linear(torch.zeros(17, K, dtype=dtype, device=triton_device), w)


@pytest.mark.parametrize("T, N, K, splits", [(3, 70, 100, 4), (1, 33, 24, 8), (5, 130, 77, 2), (8, 64, 512, 4)])
def test_few_rows_linear_split_k_partials_sum_to_the_product(triton_device, T, N, K, splits):
    """Split-K runs of the reduction, K not a multiple of splits x the tile: no column counted twice or missed."""
    fused = importlib.import_module("moestack.moe.fused")
    importlib.import_module("moestack.moe.fused_triton")
    g = torch.Generator().manual_seed(K)
    x, w = (torch.randn(*shape, generator=g).to(triton_device) for shape in ((T, K), (N, K)))
    parts = fused.few_rows_linear(x, w, splits)
    assert parts.shape == (splits, T, N) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(0), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_model_head_takes_the_few_rows_gemm_for_decode_batches_in_half_precision(triton_device, monkeypatch):
    """ServeModel.head: up to fused.BLOCK_M rows in fp16/bf16 through `few_rows_linear`, else the nn.Linear."""
    from moestack.serve import model as serve_model

    fused = importlib.import_module("moestack.moe.fused")
    importlib.import_module("moestack.moe.fused_triton")
    calls = []
    monkeypatch.setattr(serve_model, "few_rows_linear", lambda x, w: calls.append(x.shape[0]) or fused.few_rows_linear(x, w))
    head = serve_model.ServeModel.head
    holder = torch.nn.Module()
    holder.lm_head = torch.nn.Linear(32, 90, bias=False)
    for rows, dtype, taken in ((8, torch.float16, True), (17, torch.float16, False), (8, torch.float32, False)):
        holder.lm_head.to(triton_device, dtype)
        x = torch.randn(rows, 32).to(triton_device, dtype)
        before = len(calls)
        with torch.inference_mode():
            got = head(holder, x)
        assert calls[before:] == ([rows] if taken else [])
        assert torch.allclose(got.float(), F.linear(x.float(), holder.lm_head.weight.float()), atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("page, H, Hkv, hd", [(4, 4, 2, 8), (16, 4, 4, 16), (3, 6, 2, 8)])
def test_paged_prefill_matches_sdpa(triton_device, page, H, Hkv, hd):
    """Fresh prompts, a chunk after cached keys, a decode row and a sequence with no new tokens in one step,
    plus padding rows that belong to no sequence (they come out zero)."""
    attn = importlib.import_module("moestack.serve.attention_triton")
    from moestack.serve.attention import prefill_block_q, query_blocks

    g = torch.Generator().manual_seed(0)
    NB, dev = 40, triton_device
    # block NB holds NaNs and fills each table past its sequence's blocks: a key read past a sequence's end shows
    kc, vc = (torch.cat([torch.randn(NB, page, Hkv, hd, generator=g), torch.full((1, page, Hkv, hd), float("nan"))])
              for _ in range(2))
    seqs = [(5, 5), (9, 3), (1, 1), (20, 20), (7, 0), (30, 1)]  # (keys in the cache, new tokens)
    tables = torch.stack([torch.randperm(NB, generator=g)[:11] for _ in seqs]).to(torch.int32)
    for b, (c, _) in enumerate(seqs):
        tables[b, -(-c // page):] = NB
    qlen = torch.tensor([n for _, n in seqs])
    T = int(qlen.sum()) + 3
    q = torch.randn(T, H, hd, generator=g)
    q_start = torch.cat([torch.zeros(1, dtype=torch.long), qlen.cumsum(0)]).to(torch.int32)
    ctx = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    bq = prefill_block_q(H, Hkv)
    blocks = query_blocks(q_start.to(dev), bq, -(-T // bq) + len(seqs))
    out = attn.paged_prefill(q.to(dev), kc.to(dev), vc.to(dev), tables.to(dev), q_start.to(dev), ctx.to(dev),
                             blocks, bq).cpu()
    for b, (c, n) in enumerate(seqs):
        pos = torch.arange(c)
        k, v = (t[tables[b, pos // page].long(), pos % page].transpose(0, 1) for t in (kc, vc))  # [Hkv, c, hd]
        rows = slice(int(q_start[b]), int(q_start[b + 1]))
        mask = pos[None, :] <= torch.arange(c - n, c)[:, None]
        ref = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k, v, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(out[rows], ref.transpose(0, 1), atol=1e-5), b
    assert (out[int(qlen.sum()):] == 0).all()


def test_engine_through_the_prefill_kernel_equals_the_reference_engine(triton_device, tmp_path):
    """Every step that is not all decodes through the Triton prefill kernel (on the CPU forced on; on CUDA the
    default): chunked prefill, prefix-cache hits and preemption give the reference engine's tokens."""
    from moestack.serve import LLM, SamplingParams

    importlib.import_module("moestack.serve.attention_triton")
    hf_folder(tmp_path, "mixtral")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    shared = list(range(3, 15))
    prompts = [shared + [20, 21], [9, 8, 7, 6, 5, 4, 3], shared + [30], [11] * 13]
    kw = dict(device=triton_device, dtype="float32", block_size=4, num_blocks=9, max_num_batched_tokens=10,
              cuda_graphs=False)
    ref = LLM(str(tmp_path), **kw)
    ref.runner.paged_prefill = False
    want = ref.generate(prompts, params, use_tqdm=False)
    llm = LLM(str(tmp_path), **kw)
    llm.runner.paged_prefill = True
    calls = []
    real = llm.runner.prepare

    def spy(batch, ahead=0):
        out = real(batch, ahead)
        calls.append(out[2].prefill)
        return out

    llm.runner.prepare = spy
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert any(calls) and llm.stats.cached_tokens > 0 and llm.scheduler.num_preemptions > 0
    llm.check_blocks()


@pytest.mark.parametrize("T, E, k, parts, drop, F2", [(5, 8, 2, 1, False, 32), (40, 8, 2, 2, True, 32),
                                                     (3, 16, 4, 2, False, 32), (6, 4, 2, 2, True, 128),
                                                     (7, 4, 2, 4, True, 128), (160, 4, 2, 1, False, 32),
                                                     (160, 4, 2, 2, True, 128), (130, 4, 2, 4, True, 128),
                                                     (140, 4, 2, 2, False, 32)])
def test_fused_experts_match_a_loop(triton_device, monkeypatch, T, E, k, parts, drop, F2):
    """With parts to run (DualSparse), F2 = 128 makes whole column tiles and reduction steps skippable: the
    experts 0 and 1 run at most one part, so their blocks skip the rest (and their garbage is never read).
    T >= 128 at E = 4, k = 2 is prefill-sized (64+ entries per expert): blocks of 64 rows, grouped by
    (expert, parts run)."""
    fused = importlib.import_module("moestack.moe.fused")
    importlib.import_module("moestack.moe.fused_triton")
    monkeypatch.setattr(fused, "LARGE_MIN_ROWS", 256)  # prefill-sized from 256 entries (CPU-test sizes)
    g = torch.Generator().manual_seed(1)
    D = 32
    f = F2 // parts
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, D, 2 * F2, generator=g) / 4, torch.randn(E, F2, D, generator=g) / 4
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    run = torch.randint(0, parts + 1, (T, k), generator=g) if drop else None
    if run is not None and F2 == 128:
        run = torch.where(ids < 2, run.clamp(max=1), run)
    dev = triton_device
    y = fused.fused_experts(x.to(dev), ids.to(dev), w.to(dev), w13.to(dev), w2.to(dev), parts,
                            None if run is None else run.to(dev)).cpu()
    if T * k < fused.LARGE_MIN_ROWS:  # decode-sized: also with the router's plan of every choice (Routing.plan)
        p = fused.align(ids.flatten().to(dev), E)
        y_plan = fused.fused_experts(x.to(dev), ids.to(dev), w.to(dev), w13.to(dev), w2.to(dev), parts,
                                     None if run is None else run.to(dev), (p.sorted_ids, p.block_expert, p.total)).cpu()
        assert torch.allclose(y_plan, y, atol=1e-5)
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
    fast.model.fused_norms = True  # as on CUDA: the MoE's choice rows go unsummed to the next add (`add_norm`)
    calls = []
    real = fast.model.moe_layers()[0].fused

    def spy(x, routing, summed=True):
        y = real(x, routing, summed)
        calls.append(None if y is None else y.dim())
        return y

    fast.model.moe_layers()[0].fused = spy
    got = fast.generate(prompts, params, use_tqdm=False)
    assert calls and all(d == 3 for d in calls)  # every step of that layer: fused kernels, rows left to the add
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_half_precision_decode_with_split_out_projection_and_few_rows_head(triton_device, tmp_path, monkeypatch):
    """fp16, the serving paths of a CUDA engine: the out projection as split-K partials and the MoE's choice rows,
    both summed by the add + norm after them, the LM head through `few_rows_linear`. Each token is the argmax of
    the eager model's logits over the same sequence (no fused kernels, summed outputs), up to fp16 noise."""
    from moestack.serve import LLM, SamplingParams
    from moestack.serve import model as serve_model

    importlib.import_module("moestack.moe.fused_triton")
    hf_folder(tmp_path, "qwen3_moe")
    monkeypatch.setattr(serve_model, "few_rows_splits", lambda n, k, sms: 2)  # the tiny out projection splits too
    splits = []
    real = serve_model.few_rows_linear
    monkeypatch.setattr(serve_model, "few_rows_linear", lambda x, w, s=1: splits.append(s) or real(x, w, s))
    llm = LLM(str(tmp_path), device=triton_device, dtype="float16", block_size=4, num_blocks=64, fused_rows=1024,
              cuda_graphs=False)
    model = llm.model
    model.fused_norms = True  # as on CUDA
    prompts = [[2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3], [11] * 6]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert 2 in splits and 1 in splits  # out projections split, LM heads whole
    model.fused_norms = False
    for m in model.moe_layers():
        m.fused_rows = 0
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            seq = torch.tensor([p + o.token_ids], device=triton_device)
            logits = model(seq)[0, len(p) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(o.token_ids, device=triton_device)[:, None])[:, 0]
            assert (logits.max(1).values - chosen).max() < 0.02 * logits.abs().max(), p


@pytest.mark.parametrize("policy", ["token", "auto"])
def test_dualsparse_engine_with_the_fused_kernels_equals_the_eager_engine(triton_device, tmp_path, policy):
    """At 50% dropped, decode steps through the fused kernels (parts to run from one Triton kernel, unrun
    parts skipped inside the GEMMs) give the eager dropping engine's tokens and skip the same computations:
    per token, and (auto) dropping whole sub-experts in the decode steps."""
    from moestack.serve import LLM, SamplingParams

    importlib.import_module("moestack.moe.fused_triton")
    importlib.import_module("moestack.moe.rows_triton")
    hf_folder(tmp_path, "qwen3_moe")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [[2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3], [11] * 6]
    kw = dict(device=triton_device, dtype="float32", block_size=4, num_blocks=64, cuda_graphs=False,
              drop_rate=0.5, drop_policy=policy, calib_batches=2)
    eager, fast = LLM(str(tmp_path), fused_rows=0, **kw), LLM(str(tmp_path), fused_rows=1024, **kw)
    for llm in (eager, fast):
        for layer in llm.model.moe_layers():
            layer.dispatcher.reset_stats()
    for layer in fast.model.moe_layers():  # the decode router too (on CUDA the runner turns it on): top-k and
        layer.router.fused_topk = True  # the plan in one Triton kernel, the drops on that plan
    layer = fast.model.moe_layers()[0]
    real, fused_steps = layer.fused, []
    layer.fused = lambda x, routing, summed=True: fused_steps.append(real(x, routing, summed)) or fused_steps[-1]
    ref = eager.generate(prompts, params, use_tqdm=False)
    got = fast.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert fused_steps and all(y is not None for y in fused_steps)
    assert layer.last_routing.plan is not None  # the last (decode) step ran on the router's plan
    assert layer.dispatcher.whole(layer.last_routing) == (policy == "auto")
    for a, b in zip(eager.model.moe_layers(), fast.model.moe_layers()):
        assert a.dispatcher._stats.tolist() == b.dispatcher._stats.tolist()
        assert 0 < a.dispatcher.skipped < a.dispatcher.total


@pytest.mark.parametrize("R, E, block_m, skip", [(64, 64, 16, False), (37, 6, 16, True), (300, 128, 16, True),
                                                 (5, 200, 64, False)])
def test_align_kernel_equals_the_eager_plan(triton_device, R, E, block_m, skip):
    """The decode plan in one Triton kernel: the same sorted entries, block experts and total as fused.align."""
    fused_triton = importlib.import_module("moestack.moe.fused_triton")
    from moestack.moe import fused

    g = torch.Generator().manual_seed(R)
    ids = torch.randint(0, E + int(skip), (R,), generator=g)  # E: an entry not to run
    ref = fused.align(ids, E, block_m)
    got = fused_triton.align(ids.to(triton_device), E, block_m, ref.sorted_ids.numel())
    assert torch.equal(got[0].cpu(), ref.sorted_ids) and torch.equal(got[1].cpu(), ref.block_expert)
    assert torch.equal(got[2].cpu(), ref.total)


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_by_sort_equals_align_by_running_count(monkeypatch, block_m):
    """Past ONEHOT_CELLS the plan comes from a stable sort: the same plan as the one-hot running count."""
    fused = importlib.import_module("moestack.moe.fused")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 9, (300,), generator=g)  # 9 = the sentinel of an entry not to run (8 groups)
    a = fused.align(ids, 8, block_m)
    monkeypatch.setattr(fused, "ONEHOT_CELLS", 0)
    b = fused.align(ids, 8, block_m)
    for name in ("sorted_ids", "block_expert", "total"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.num_blocks, a.num_valid) == (b.num_blocks, b.num_valid)
    assert sorted(a.sorted_ids[a.sorted_ids < 300].tolist()) == (ids < 8).nonzero().flatten().tolist()

