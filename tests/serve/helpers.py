"""Tiny servable checkpoints built here (nothing downloads): Hugging Face folders with a character tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

from tests.inference.hf_tiny import tiny_model

CHARS = string.ascii_lowercase + string.digits + " .,:;!?()=+-*/_\n'\"#<>[]{}%"  # 62 -> ids 2..63
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def char_tokenizer():
    """A character-level fast tokenizer over the 64-id vocabulary of the tiny models (eos 0, pad 1)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    assert len(vocab) == 64
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_folder(path: Path, family: str, seed: int = 0, **overrides):
    """save_pretrained a tiny `family` model and the character tokenizer into `path`; returns the HF model."""
    model = tiny_model(family, seed, eos_token_id=0, pad_token_id=1, **overrides)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Hugging Face generate's greedy continuation (eos ignored)."""
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=1)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()
