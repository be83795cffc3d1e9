"""moestack's serving engine: paged KV cache, continuous batching, CUDA-graph decode (see engine.py)."""

from moestack.serve.engine import LLM
from moestack.serve.params import Completion, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion", "RequestOutput"]
