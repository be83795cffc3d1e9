"""A small vision-language MoE trained here: scikit-learn's handwritten digits with captions, plus text.

Each image sequence is the 8x8 digit as 64 pixel tokens (a linear embedding of the pixel, a learned position
per pixel and a linear embedding of the whole image: the global context a ViT encoder gives each patch
token), then its caption as bytes ("a handwritten 7: seven."); each text sequence is bytes of the
embedded corpus (the stdlib, data.py). Training on both, with the usual load-balancing loss over the mix,
lets experts specialise by modality, so a prefill batch of images crowds onto the vision experts: the
skew ReaLB exploits (docs/methods/realb.md reports it). Nothing downloads: the digits ship inside
scikit-learn (an optional dependency, `pip install moestack[vision]`).
Notation: B batch, P = 64 image tokens, C caption bytes, S = P + C.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from moestack.config import Config, ModelConfig, MoEConfig
from moestack.data import load_tokens
from moestack.models.transformer import MoETransformer

IMAGE_TOKENS = 64  # 8 x 8 pixels, one token each
CAPTION_BYTES = 24
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_AT = len(b"a handwritten ")  # the caption byte that names the digit (accuracy is measured there)


def caption(d: int) -> bytes:
    return f"a handwritten {d}: {WORDS[d]}.".encode()


class VisionLanguageMoE(MoETransformer):
    """MoETransformer whose image sequences start with P pixel tokens instead of byte embeddings."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.model.d_model
        self.vision = nn.Linear(1, d)
        self.vision_pos = nn.Parameter(torch.randn(IMAGE_TOKENS, d) * 0.02)
        self.vision_global = nn.Linear(IMAGE_TOKENS, d)

    def embed_inputs(self, idx: torch.Tensor, pixels: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """idx [B, S] bytes, pixels [B, P] in [0, 1], is_image [B] -> embeddings [B, S, D]."""
        h = self.embed(idx)
        img = self.vision(pixels.unsqueeze(-1)) + self.vision_pos + self.vision_global(pixels).unsqueeze(1)  # [B, P, D]
        mask = torch.zeros_like(idx, dtype=torch.bool)
        mask[:, :IMAGE_TOKENS] = is_image.unsqueeze(1)
        return torch.where(mask.unsqueeze(-1), torch.cat([img, h[:, IMAGE_TOKENS:]], 1), h)

    def forward(self, idx, targets=None, pixels=None, is_image=None):
        if pixels is None:
            return super().forward(idx, targets)
        return self.forward_embeds(self.embed_inputs(idx, pixels, is_image), targets)


def vision_mask(batch: dict) -> torch.Tensor:
    """bool [B, S]: which tokens of the batch are image tokens."""
    B, S = batch["idx"].shape
    m = torch.zeros(B, S, dtype=torch.bool)
    m[:, :IMAGE_TOKENS] = batch["is_image"].unsqueeze(1)
    return m


class DigitsData:
    """Digit images with captions (train: the first 1500 of 1797, val: the rest) and text crops."""

    def __init__(self, seed: int = 0):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits vision-language data needs scikit-learn: pip install 'moestack[vision]'") from e
        d = load_digits()
        self.images = torch.tensor(d.images.reshape(len(d.images), -1) / 16.0, dtype=torch.float32)  # [N, 64]
        self.labels = torch.tensor(d.target)
        self.text = torch.from_numpy(load_tokens(max_bytes=2 << 20).astype(np.int64))
        self.split = {"train": torch.arange(0, 1500), "val": torch.arange(1500, len(self.labels))}
        self.seed = seed

    @property
    def seq_len(self) -> int:
        return IMAGE_TOKENS + CAPTION_BYTES

    def image_batch(self, ids: torch.Tensor) -> dict:
        B, S = ids.numel(), self.seq_len
        idx = torch.full((B, S), ord(" "), dtype=torch.int64)
        tgt = torch.full((B, S), -100, dtype=torch.int64)
        for b, i in enumerate(ids.tolist()):
            c = torch.tensor(list(caption(int(self.labels[i]))))
            idx[b, IMAGE_TOKENS:IMAGE_TOKENS + len(c)] = c
            tgt[b, IMAGE_TOKENS - 1:IMAGE_TOKENS - 1 + len(c)] = c  # the last pixel predicts the first byte
        return {"idx": idx, "targets": tgt, "pixels": self.images[ids], "is_image": torch.ones(B, dtype=torch.bool),
                "labels": self.labels[ids]}

    def text_batch(self, split: str, n: int, gen: torch.Generator) -> dict:
        S = self.seq_len
        half = len(self.text) * 9 // 10
        lo, hi = (0, half - S - 1) if split == "train" else (half, len(self.text) - S - 1)
        starts = torch.randint(lo, hi, (n,), generator=gen)
        rows = torch.stack([self.text[s:s + S + 1] for s in starts.tolist()])
        return {"idx": rows[:, :-1], "targets": rows[:, 1:], "pixels": torch.zeros(n, IMAGE_TOKENS),
                "is_image": torch.zeros(n, dtype=torch.bool), "labels": torch.full((n,), -1)}

    def batch(self, split: str, images: int, texts: int, gen: torch.Generator) -> dict:
        """`images` random image sequences then `texts` text sequences."""
        pool = self.split[split]
        parts = []
        if images:
            parts.append(self.image_batch(pool[torch.randint(len(pool), (images,), generator=gen)]))
        if texts:
            parts.append(self.text_batch(split, texts, gen))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def vlm_config(num_experts: int = 128, top_k: int = 8, d_model: int = 128, d_ff: int = 48, n_layers: int = 4) -> Config:
    """Routing like Qwen3-VL-30B-A3B's (128 experts, top-8, expert width 0.375 d) by default."""
    return Config(model=ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=4, seq_len=IMAGE_TOKENS + CAPTION_BYTES),
                  moe=MoEConfig(num_experts=num_experts, top_k=top_k, d_ff=d_ff))


@dataclass
class VLMResult:
    model: VisionLanguageMoE
    history: list[dict]
    seconds: float


def train_vlm(cfg: Config, data: DigitsData, steps: int = 600, batch: int = 32, lr: float = 3e-3, seed: int = 0,
              progress: bool = True) -> VLMResult:
    """Train on half image, half text batches with AdamW and a cosine schedule (CPU, about a minute)."""
    torch.manual_seed(seed)
    model = VisionLanguageMoE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    history, t0 = [], time.time()
    bar = tqdm(range(steps), desc="train vlm", disable=not progress)
    for step in bar:
        b = data.batch("train", batch // 2, batch - batch // 2, gen)
        _, loss, aux = model(b["idx"], b["targets"], b["pixels"], b["is_image"])
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    return VLMResult(model.eval(), history, time.time() - t0)


@torch.no_grad()
def evaluate(model: VisionLanguageMoE, b: dict, before_forward=None) -> dict:
    """Caption loss (mean over caption bytes of image sequences, and over text bytes) and digit accuracy."""
    if before_forward is not None:
        before_forward(b)
    logits, _, _ = model(b["idx"], None, b["pixels"], b["is_image"])
    logp = torch.log_softmax(logits.float(), -1)
    tgt = b["targets"]
    valid = tgt >= 0
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, S]
    img = b["is_image"]
    out = {"loss": float(nll[valid].mean())}
    if img.any():
        v = valid[img]
        out["caption_loss"] = float(nll[img][v].mean())
        pred = logits[img][:, IMAGE_TOKENS - 1 + DIGIT_AT].argmax(-1)  # the byte naming the digit
        out["accuracy"] = float((pred == (ord("0") + b["labels"][img])).float().mean())
    if (~img).any():
        out["text_loss"] = float(nll[~img][valid[~img]].mean())
    return out
