"""The digits vision-language MoE: data shapes, image tokens in the embeddings, training lowers the loss."""

import torch

from moestack.models.vlm import CAPTION_BYTES, IMAGE_TOKENS, DigitsData, caption, evaluate, train_vlm, vision_mask, vlm_config


def test_data_and_model_shapes():
    data = DigitsData()
    b = data.batch("train", 3, 2, torch.Generator().manual_seed(0))
    assert b["idx"].shape == (5, IMAGE_TOKENS + CAPTION_BYTES) and b["pixels"].shape == (5, IMAGE_TOKENS)
    assert b["is_image"].tolist() == [True] * 3 + [False] * 2
    c = caption(int(b["labels"][0]))
    assert bytes(b["targets"][0, IMAGE_TOKENS - 1:IMAGE_TOKENS - 1 + len(c)].tolist()) == c
    assert (b["targets"][0, :IMAGE_TOKENS - 1] == -100).all()  # pixels are not predicted
    assert vision_mask(b).sum() == 3 * IMAGE_TOKENS
    assert set(data.split["train"].tolist()).isdisjoint(data.split["val"].tolist())


def test_pixels_reach_the_model_and_training_learns():
    data = DigitsData()
    cfg = vlm_config(num_experts=4, top_k=2, d_model=32, d_ff=16, n_layers=2)
    res = train_vlm(cfg, data, steps=60, batch=16, lr=1e-2, progress=False)
    first, last = res.history[0]["loss"], sum(h["loss"] for h in res.history[-5:]) / 5
    assert last < 0.7 * first
    b = data.image_batch(data.split["val"][:8])
    out = evaluate(res.model, b)
    assert {"loss", "caption_loss", "accuracy"} <= set(out)
    b2 = dict(b, pixels=torch.rand_like(b["pixels"]))
    with torch.no_grad():  # other pixels, other predictions: the image tokens are read
        assert not torch.allclose(res.model(b["idx"], None, b["pixels"], b["is_image"])[0],
                                  res.model(b2["idx"], None, b2["pixels"], b2["is_image"])[0])
