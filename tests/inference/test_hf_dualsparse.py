"""DualSparse on Hugging Face models converted with from_hf: exact at zero drop, drops when asked."""

import pytest
import torch

pytest.importorskip("transformers")

from moestack.inference.dualsparse import drop_stats, reset_drop_stats, set_drop_rate, sparsify  # noqa: E402
from moestack.models.hf import SUPPORTED, from_hf  # noqa: E402
from tests.inference.hf_tiny import tiny_model, tokens  # noqa: E402


@pytest.mark.parametrize("family", SUPPORTED)
def test_zero_drop_keeps_the_logits_of_every_hf_family(family):
    model, x = tiny_model(family), tokens()
    with torch.no_grad():
        want = model(x).logits
        from_hf(model)
        sparsify(model, [tokens(seed=5), {"input_ids": tokens(seed=6)}], drop_rate=0.0, parts=2)
        got = model(x).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        set_drop_rate(model, 0.4)
        reset_drop_stats(model)
        dropped = model(x).logits
    assert 0.2 < drop_stats(model)["drop_rate"] < 0.6
    assert not torch.allclose(dropped, want, atol=1e-5)
