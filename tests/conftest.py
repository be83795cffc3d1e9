"""Shared fixtures."""

import os
import sys

import pytest
import torch

TRITON_KERNELS = ("moestack.moe.swiglu_triton", "moestack.moe.rows_triton", "moestack.moe.fused_triton",
                  "moestack.serve.attention_triton", "moestack.inference.lowp_triton",
                  "moestack.serve.qkv_triton", "moestack.moe.router_triton", "moestack.serve.norm_triton",
                  "moestack.serve.argmax_triton")

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under Triton's interpreter, which has to be on when triton is
    # first imported (its own library functions are decorated then). Tests run with it off (the eager
    # paths) unless they ask for `triton_device`; moestack reads TRITON_INTERPRET per call.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture
def triton_device(monkeypatch):
    """Where the Triton kernels run: the GPU, or without one the CPU under Triton's interpreter (the same
    kernel code, run slowly by Python; the kernel modules are imported afresh so `triton.jit` interprets)."""
    if torch.cuda.is_available():
        yield "cuda"
        return
    pytest.importorskip("triton", reason="the Triton interpreter needs the triton package (make setup installs it)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    saved = {name: sys.modules.pop(name) for name in TRITON_KERNELS if name in sys.modules}
    yield "cpu"
    for name in TRITON_KERNELS:
        sys.modules.pop(name, None)
    sys.modules.update(saved)
