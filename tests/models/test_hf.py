"""from_hf / to_hf on tiny Hugging Face MoE models of every supported family (built from configs)."""

import pytest
import torch

pytest.importorskip("transformers")

from moestack.models.hf import SUPPORTED, GatedSharedExpert, MoEBlock, from_hf, to_hf  # noqa: E402
from moestack.moe.layer import MoELayer  # noqa: E402
from tests.inference.hf_tiny import tiny_model, tokens  # noqa: E402

CASES = [("mixtral", {}), ("qwen2_moe", {}), ("qwen2_moe", {"norm_topk_prob": True}), ("qwen3_moe", {}),
         ("qwen3_moe", {"norm_topk_prob": False}), ("olmoe", {}), ("olmoe", {"norm_topk_prob": True})]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family, overrides", CASES)
def test_from_hf_keeps_the_logits(family, overrides):
    model, x = tiny_model(family, **overrides), tokens()
    want = logits(model, x)
    from_hf(model)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2 and all(isinstance(b.moe, MoELayer) for b in blocks)
    torch.testing.assert_close(logits(model, x), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, dtype", [(f, torch.bfloat16) for f in SUPPORTED] + [("olmoe", torch.float16)])
def test_from_hf_keeps_the_logits_of_a_half_precision_model(family, dtype):
    """from_pretrained keeps a checkpoint's bf16: the router must round its logits as HF does, or near-tied
    experts are chosen differently (max |diff| 0.05-0.1 on these models with fp32 gate logits)."""
    model, x = tiny_model(family).to(dtype), tokens(4, 16)
    want = logits(model, x).float()
    from_hf(model)
    # Mixtral keeps its routing weights in fp32 and applies them in another order: bf16 rounding differs a little
    torch.testing.assert_close(logits(model, x).float(), want, atol=1e-2 if family == "mixtral" else 1e-3, rtol=0)


def test_from_hf_keeps_the_logits_under_autocast():
    """HF's experts compute in their weights' dtype under autocast; the converted layers do the same."""
    model, x = tiny_model("mixtral"), tokens(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logits(model, x).float()
        from_hf(model)
        got = logits(model, x).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", SUPPORTED)
def test_round_trip_restores_the_hugging_face_blocks(family):
    model, x = tiny_model(family), tokens()
    want = logits(model, x)
    names = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp")}
    to_hf(from_hf(model))
    assert {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp")} == names
    torch.testing.assert_close(logits(model, x), want, atol=1e-6, rtol=0)


def test_to_hf_carries_weight_changes_back():
    model, x = tiny_model("mixtral"), tokens()
    from_hf(model)
    with torch.no_grad():
        model.model.layers[0].mlp.moe.experts.w2.mul_(2.0)
    want = logits(model, x)
    to_hf(model)
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
    torch.testing.assert_close(logits(model, x), want, atol=1e-4, rtol=0)


def test_qwen2_moe_shared_expert_keeps_its_sigmoid_gate():
    model = from_hf(tiny_model("qwen2_moe"))
    layer = model.model.layers[0].mlp.moe
    assert isinstance(layer.shared, GatedSharedExpert) and layer.shared.gate.weight.shape == (1, 32)
    assert not layer.router.renormalize


def test_router_weights_are_shared_not_copied():
    model = tiny_model("olmoe")
    gate = model.model.layers[1].mlp.gate.weight
    from_hf(model)
    assert model.model.layers[1].mlp.moe.router.gate.weight is gate


def test_dense_layers_of_qwen_moe_stay_dense():
    model = from_hf(tiny_model("qwen3_moe", mlp_only_layers=[0]))
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    assert isinstance(model.model.layers[1].mlp, MoEBlock)


def test_unsupported_models_get_a_clear_error():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="MoE models of type mixtral, qwen2_moe, qwen3_moe, olmoe"):
        from_hf(transformers.LlamaForCausalLM(cfg))


def test_output_router_logits_is_one_clear_error():
    model, x = from_hf(tiny_model("mixtral")), tokens()
    with pytest.raises(ValueError, match="output_router_logits=True is not supported.*to_hf"):
        model(x, output_router_logits=True)
    assert model(x).logits.shape[:2] == x.shape  # without it the converted model runs
