"""The serving step's Triton kernels compile for an H100 / H200 (sm_90) on any machine: Triton's own compiler and
its bundled ptxas, no GPU. The CPU tests run these kernels under Triton's interpreter, which accepts code the
compiler rejects; this catches that before a GPU run does. The compiles run in a child process: this test
process imported triton with its interpreter on (tests/conftest.py), and the compiler cannot run there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs the triton package (make setup installs it)")

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


def compile_all() -> dict:
    """Run in the child: {case: "ok" or the compiler's error}."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for case, (module, kernel, signature, constexprs) in CASES.items():
        fn = getattr(importlib.import_module(module), kernel)
        while not isinstance(fn, triton.runtime.JITFunction):  # an autotuned kernel: the jitted function under it
            fn = fn.fn
        sig = {**signature, **{name: "constexpr" for name in constexprs}}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32))
            out[case] = "ok" if ".target sm_90" in compiled.asm["ptx"] and compiled.asm["cubin"] else "no sm_90 cubin"
        except Exception as e:  # noqa: BLE001 - reported per case by the test
            out[case] = f"{type(e).__name__}: {e}"[:3000]
    return out


MOE_GEMM_ARGS = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", w_ptr="*fp32", j_ptr="*i32", sorted_ptr="*i32",
                     block_expert_ptr="*i32", total_ptr="*i32", N="i32", K="i32", num_valid="i32", stride_am="i32",
                     stride_be="i32", stride_bk="i32", stride_bn="i32", stride_cm="i32", R_BUCKET="i32", PART="i32")
TOPK_PLAN_ARGS = dict(logits_ptr="*bf16", bias_ptr="*bf16", ids_ptr="*i64", w_ptr="*fp32", counts_ptr="*i64",
                      sorted_ptr="*i32", block_expert_ptr="*i32", total_ptr="*i32", T="i32", E="i32", stride_t="i32",
                      cap="i32", num_blocks="i32")
NORM_ARGS = dict(h_ptr="*bf16", y_ptr="*bf16", w_ptr="*bf16", sum_ptr="*bf16", out_ptr="*bf16", D="i32", eps="fp32",
                 stride_h="i32", stride_y="i32", stride_ys="i32")

DECODE_ARGS = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", bt_ptr="*i32", lens_ptr="*i32", out_ptr="*bf16",
                   part_ptr="*fp32", scale="fp32", stride_qb="i32", stride_qh="i32", stride_kb="i32", stride_ks="i32",
                   stride_kh="i32", stride_bt="i32", stride_ob="i32", stride_oh="i32")

CASES = {
    "paged_decode_split8": ("moestack.serve.attention_triton", "_paged_decode", DECODE_ARGS,
                            dict(G=8, HD=128, BLOCK_G=16, BLOCK_D=128, BLOCK_N=64, PAGE=16, PREC="tf32", SPLITS=8)),
    "paged_decode_whole": ("moestack.serve.attention_triton", "_paged_decode", DECODE_ARGS,
                           dict(G=1, HD=128, BLOCK_G=16, BLOCK_D=128, BLOCK_N=64, PAGE=16, PREC="tf32", SPLITS=1)),
    "paged_decode_whole_128": ("moestack.serve.attention_triton", "_paged_decode", DECODE_ARGS,
                               dict(G=1, HD=128, BLOCK_G=16, BLOCK_D=128, BLOCK_N=128, PAGE=16, PREC="tf32", SPLITS=1)),
    "paged_decode_combine": ("moestack.serve.attention_triton", "_paged_decode_combine",
                             dict(part_ptr="*fp32", out_ptr="*bf16", stride_ob="i32", stride_oh="i32", H="i32"),
                             dict(HD=128, BLOCK_D=128, SPLITS=8)),
    "moe_gemm_swiglu": ("moestack.moe.fused_triton", "_moe_gemm", MOE_GEMM_ARGS,
                        dict(A_DIV=8, MUL_W=False, PARTS_N=False, PARTS_K=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                             PREC="tf32", SWIGLU=True, SPLIT=1)),
    "moe_gemm_swiglu_parts": ("moestack.moe.fused_triton", "_moe_gemm", MOE_GEMM_ARGS,
                              dict(A_DIV=8, MUL_W=False, PARTS_N=True, PARTS_K=False, BLOCK_M=16, BLOCK_N=64,
                                   BLOCK_K=128, PREC="tf32", SWIGLU=True, SPLIT=1)),
    "moe_gemm_down": ("moestack.moe.fused_triton", "_moe_gemm", MOE_GEMM_ARGS,
                      dict(A_DIV=1, MUL_W=True, PARTS_N=False, PARTS_K=True, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64,
                           PREC="tf32", SWIGLU=False, SPLIT=1)),
    "moe_gemm_split4": ("moestack.moe.fused_triton", "_moe_gemm", {**MOE_GEMM_ARGS, "c_ptr": "*fp32"},
                        dict(A_DIV=1, MUL_W=False, PARTS_N=False, PARTS_K=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                             PREC="tf32", SWIGLU=False, SPLIT=4)),
    "topk_plan_b8": ("moestack.moe.router_triton", "_topk_plan", TOPK_PLAN_ARGS,
                     dict(K=8, BLOCK_T=8, BLOCK_E=128, BLOCK_K=8, RENORM=True, BIAS=False, BLOCK_M=16, FILL=1024, CH=32)),
    "topk_plan_b64_bias": ("moestack.moe.router_triton", "_topk_plan", TOPK_PLAN_ARGS,
                           dict(K=8, BLOCK_T=64, BLOCK_E=128, BLOCK_K=8, RENORM=False, BIAS=True, BLOCK_M=16, FILL=1024,
                                CH=32)),
    "align": ("moestack.moe.fused_triton", "_align",
              dict(ids_ptr="*i64", rank_ptr="*i32", sorted_ptr="*i32", block_expert_ptr="*i32", total_ptr="*i32",
                   R="i32", E="i32", cap="i32", num_blocks="i32"), dict(BLOCK_M=16, E_BLOCK=128, CH=32, FILL=1024)),
    "argmax_chunks": ("moestack.serve.argmax_triton", "_chunk_max",
                      dict(x_ptr="*bf16", val_ptr="*fp32", idx_ptr="*i32", V="i32", stride_r="i32", CHUNKS="i32"),
                      dict(BLOCK=4096)),
    "argmax_rows": ("moestack.serve.argmax_triton", "_row_max",
                    dict(val_ptr="*fp32", idx_ptr="*i32", out_ptr="*i64", CHUNKS="i32"), dict(BLOCK_C=64)),
    "rms_norm": ("moestack.serve.norm_triton", "_add_rms_norm", NORM_ARGS, dict(BLOCK_D=2048, ADD=False, S=1)),
    "add_rms_norm": ("moestack.serve.norm_triton", "_add_rms_norm", NORM_ARGS, dict(BLOCK_D=4096, ADD=True, S=1)),
    "add_rms_norm_partials": ("moestack.serve.norm_triton", "_add_rms_norm", {**NORM_ARGS, "y_ptr": "*fp32"},
                              dict(BLOCK_D=2048, ADD=True, S=4)),
    "add_rms_norm_choices": ("moestack.serve.norm_triton", "_add_rms_norm", NORM_ARGS, dict(BLOCK_D=2048, ADD=True, S=8)),
    "whole_parts_b64": ("moestack.moe.rows_triton", "_whole_parts",
                        dict(w_ptr="*fp32", ids_ptr="*i64", scale_ptr="*fp32", valid_ptr="*i64", j_ptr="*i32",
                             tot_ptr="*fp32", cnt_ptr="*i32", flag_ptr="*i32", stats_ptr="*i64", R="i32", K="i32",
                             NSUB="i32", rate_q="i32"),
                        dict(P=2, HAS_VALID=True, RATE_BITS=20, BLOCK_R=512, NS=256)),
}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    code = "import json; from tests.test_kernels_compile import compile_all; print(json.dumps(compile_all()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_sm90(compiled, case):
    assert compiled[case] == "ok", compiled[case]


if __name__ == "__main__":
    print(json.dumps(compile_all(), indent=1))
