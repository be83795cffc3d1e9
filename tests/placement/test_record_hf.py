"""record_hf on a tiny Hugging Face Mixtral: hooks on the router gates give the model's own routing."""

import numpy as np
import pytest
import torch

from moestack.placement import record_hf
from moestack.placement.trace import hf_router_gates, pair_counts

transformers = pytest.importorskip("transformers")


def tiny_mixtral():
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


def test_record_hf_matches_router_logits_of_the_model():
    model = tiny_mixtral()
    assert len(hf_router_gates(model)) == 2
    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    trace = record_hf(model, batches[:2] + [{"input_ids": batches[2]}])  # tensors or kwargs dicts

    counts = np.zeros((2, 4), dtype=np.int64)
    transitions = np.zeros((1, 4, 4), dtype=np.int64)
    with torch.no_grad():
        for batch in batches:
            logits = model(batch, output_router_logits=True).router_logits  # per layer [T, E]
            ids = [torch.topk(torch.softmax(x.float(), -1), 2, -1).indices.numpy() for x in logits]
            for layer, layer_ids in enumerate(ids):
                counts[layer] += np.bincount(layer_ids.ravel(), minlength=4)
            transitions[0] += pair_counts(ids[0], ids[1], 4)
    assert trace.top_k == 2 and trace.num_tokens == 3 * 2 * 8
    np.testing.assert_array_equal(trace.counts, counts)
    np.testing.assert_array_equal(trace.transitions, transitions)
    assert not model.training
