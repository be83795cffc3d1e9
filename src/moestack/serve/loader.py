"""Load what the engine serves: a moestack run folder or a Hugging Face MoE checkpoint folder.

Hugging Face checkpoints (`config.json` + safetensors, as `save_pretrained` writes them) are read with
`transformers.AutoConfig` and `AutoTokenizer` and their tensors mapped by name into `serve.model.ServeModel`
(moestack modules only; no Hugging Face module runs), the way vLLM's model loaders do. Both expert layouts
are read: one tensor per expert (`experts.{e}.gate_proj`, Mixtral's `w1/w3/w2`: what `save_pretrained` and
the Hub hold) and transformers v5's stacked `experts.gate_up_proj` / `experts.down_proj`.
A moestack run loads its newest good checkpoint through `runs.load_model` (PEC recovery and checks
included) and keeps its byte tokenizer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from moestack.models.hf import FAMILIES, SUPPORTED
from moestack.moe.experts import SwiGLU
from moestack.moe.layer import MoELayer
from moestack.serve.model import ModelSpec, ServeBlock, ServeModel, ServeScMoEBlock

log = logging.getLogger("moestack")


class Tokenizer:
    """What the engine needs of a tokenizer: encode, decode, end-of-sequence ids and a chat template."""

    def __init__(self, hf=None):
        self.hf = hf  # a transformers tokenizer, or None for moestack's byte tokenizer

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=True)

    def decode(self, ids) -> str:
        if self.hf is None:
            return bytes(int(t) for t in ids if 0 <= t < 256).decode("utf-8", errors="replace")  # ids past 255: special
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_new(self, ids: list[int], prefix: int, read: int) -> tuple[str, int, int]:
        """Incremental detokenization (vLLM's scheme): the text the tokens from `read` on add, decoding only
        the window from `prefix`; returns (new text, prefix, read) for the next call. Text that ends in an
        incomplete character is held back until its last byte arrives."""
        before = self.decode(ids[prefix:read])
        text = self.decode(ids[prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            return text[len(before):], read, len(ids)
        return "", prefix, read

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.hf is None or self.hf.eos_token_id is None:
            return ()
        return (int(self.hf.eos_token_id),)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat: the tokenizer's chat template, or (none, or a moestack run) plain
        "role: content" lines ending with "assistant: "."""
        if self.hf is not None and getattr(self.hf, "chat_template", None):
            out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in some transformers versions
                out = out["input_ids"]
            return list(out)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode(text)


@dataclass
class Served:
    """A loaded model ready for the engine."""

    model: ServeModel
    tokenizer: Tokenizer
    name: str  # the path it came from
    kind: str  # "moestack" | a Hugging Face family
    calib_tokens: object  # callable(batches, seq) -> list of [B, S] token batches for DualSparse calibration


def is_run(path: str | Path) -> bool:
    """Whether path is a moestack run folder (it holds the run's config.toml)."""
    return (Path(path) / "config.toml").is_file()


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> Served:
    """Load a run folder (config.toml) or a Hugging Face checkpoint folder (config.json) for serving."""
    p = Path(path)
    if is_run(p):
        return load_run(p, device, dtype)
    if (p / "config.json").is_file():
        return load_hf(p, device, dtype)
    raise ValueError(f"{path}: neither a moestack run folder (config.toml) nor a Hugging Face checkpoint folder "
                     f"(config.json + safetensors); pass one of those")


# -- moestack runs ---------------------------------------------------------------------------------------
def run_spec(cfg) -> ModelSpec:
    m = cfg.model
    hd = m.d_model // m.n_heads
    return ModelSpec("moestack", m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_heads, hd, m.seq_len,
                     norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings, scmoe=m.arch == "scmoe",
                     scmoe_position=m.scmoe_position)


def run_blocks(cfg, spec: ModelSpec) -> list[nn.Module]:
    """The serving blocks of a run, with the same FFN modules `models.transformer.build_blocks` makes."""
    from moestack.models.transformer import make_moe

    m, e = cfg.model, cfg.moe
    if m.arch == "scmoe":
        return [ServeScMoEBlock(spec, SwiGLU(m.d_model, e.d_ff), make_moe(cfg, top_k=1, shared=0))
                for _ in range(m.n_layers)]
    top_k, shared = (e.top_k, e.shared_experts) if m.arch == "top2" else (1, 1)
    blocks = []
    for i in range(m.n_layers):
        is_moe = i >= m.dense_first and (i - m.dense_first) % m.moe_every == 0
        ffn = make_moe(cfg, top_k, shared) if is_moe else SwiGLU(m.d_model, m.dense_d_ff or 2 * e.d_ff)
        blocks.append(ServeBlock(spec, ffn))
    return blocks


def load_run(run_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> Served:
    from moestack.parallel.mesh import shutdown
    from moestack.runs import load_model

    trained, cfg, ctx = load_model(run_dir, device="cpu", local=True)  # whole, also under torchrun (EP serving shards it)
    shutdown(ctx)
    spec = run_spec(cfg)
    inv_freq = 1.0 / cfg.model.rope_theta ** (torch.arange(0, spec.head_dim, 2).float() / spec.head_dim)
    with torch.device("meta"):
        model = ServeModel(spec, run_blocks(cfg, spec), inv_freq)
    state = trained.state_dict()  # module names match MoETransformer's (serve/model.py)
    model.load_state_dict(state, strict=True, assign=True)
    _finish(model, spec, inv_freq)
    default = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = model.to(device=device, dtype=dtype or default).eval()

    def calib(batches: int, seq: int):
        from moestack.data import Corpus

        corpus = Corpus.load(cfg.train.data, cfg.model.seq_len, cfg.train.data_max_mb)
        return [corpus.batch("val", 20_000 + i, 4, cfg.train.seed)[0].to(device) for i in range(batches)]

    return Served(model, Tokenizer(), str(run_dir), "moestack", calib)


# -- Hugging Face checkpoints ----------------------------------------------------------------------------
def hf_spec(config, max_len: int | None = None) -> ModelSpec:
    """ModelSpec of a Hugging Face config of a supported family (a ValueError names the supported ones)."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"moestack serve runs Hugging Face MoE models of type {', '.join(SUPPORTED)}; this checkpoint "
                         f"has model_type={family!r} (architectures {getattr(config, 'architectures', None)})")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{family}: moestack experts are SwiGLU (silu); this checkpoint uses hidden_act={act!r}")
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if family == "qwen2_moe" and not getattr(config, "use_sliding_window", False):
        window = None
    if window:  # positions past the window would attend differently: serve up to it
        limit = min(limit, window)
    eos = getattr(config, "eos_token_id", None)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    bias = bool(getattr(config, "attention_bias", False))
    return ModelSpec(
        family, config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads, hd,
        min(limit, max_len) if max_len else limit, norm_eps=config.rms_norm_eps,
        qkv_bias=bool(getattr(config, "qkv_bias", False)) if family == "qwen2_moe" else bias,
        out_bias=bias if family in ("qwen3_moe", "olmoe") else False,
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
        clip_qkv=getattr(config, "clip_qkv", None), tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        eos_token_ids=eos)


def hf_rope(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [hd/2], attention scaling) through transformers' own RoPE initialisers."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE changes with the sequence length; moestack serve supports static RoPE types")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"RoPE type {rope_type!r} is not known to transformers; expected one of {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scale)


def is_moe_layer(config, i: int) -> bool:
    family = config.model_type
    if family in ("qwen2_moe", "qwen3_moe"):
        return (i not in (config.mlp_only_layers or []) and config.num_experts > 0
                and (i + 1) % config.decoder_sparse_step == 0)
    return True


def hf_blocks(config, spec: ModelSpec) -> list[nn.Module]:
    """Serving blocks shaped like the checkpoint's layers (MoE layers as moestack MoELayers)."""
    from moestack.models.hf import GatedSharedExpert

    fam = FAMILIES[config.model_type]
    renormalize = True if fam.renormalize_key is None else bool(getattr(config, fam.renormalize_key))
    E = getattr(config, "num_local_experts", None) or config.num_experts
    F_ = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    blocks = []
    for i in range(spec.n_layers):
        if is_moe_layer(config, i):
            layer = MoELayer(spec.d_model, E, config.num_experts_per_tok, F_, renormalize=renormalize,
                             aux_loss_coef=0.0, z_loss_coef=0.0)
            layer.router.logits_in_fp32 = False  # as models/hf.py: HF rounds gate logits to the model dtype
            layer.rows_in_autocast_dtype = False
            shared = getattr(config, "shared_expert_intermediate_size", 0) if fam.gated_shared_expert else 0
            if shared:
                layer.shared = GatedSharedExpert(SwiGLU(spec.d_model, shared), nn.Linear(spec.d_model, 1, bias=False))
            ffn = layer
        else:
            ffn = SwiGLU(spec.d_model, config.intermediate_size)
        blocks.append(ServeBlock(spec, ffn))
    return blocks


def map_hf_state(config, spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ServeModel state_dict from Hugging Face tensor names (per-expert or stacked expert layouts)."""
    moe_prefix = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if config.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}, which a {config.model_type} model of this "
                             "config needs; is the folder complete (every safetensors shard present)?")
        used.add(name)
        return tensors[name]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not spec.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(spec.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "norm1.weight"] = take(src + "input_layernorm.weight")
        out[dst + "norm2.weight"] = take(src + "post_attention_layernorm.weight")
        att = src + "self_attn."
        out[dst + "attn.qkv.weight"] = torch.cat([take(att + f"{p}_proj.weight") for p in "qkv"])
        if spec.qkv_bias:
            out[dst + "attn.qkv.bias"] = torch.cat([take(att + f"{p}_proj.bias") for p in "qkv"])
        out[dst + "attn.out.weight"] = take(att + "o_proj.weight")
        if spec.out_bias:
            out[dst + "attn.out.bias"] = take(att + "o_proj.bias")
        if spec.qk_norm != "none":
            out[dst + "attn.q_norm.weight"] = take(att + "q_norm.weight")
            out[dst + "attn.k_norm.weight"] = take(att + "k_norm.weight")
        if not is_moe_layer(config, i):
            mlp = src + "mlp."
            out[dst + "ffn.w13.weight"] = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
            out[dst + "ffn.w2.weight"] = take(mlp + "down_proj.weight")
            continue
        moe = src + moe_prefix + "."
        if moe + "gate.weight" not in tensors and src + "mlp.gate.weight" in tensors:
            moe = src + "mlp."  # transformers v5 names Mixtral's block `mlp` in memory, `block_sparse_moe` on disk
        out[dst + "ffn.router.gate.weight"] = take(moe + "gate.weight")
        E = getattr(config, "num_local_experts", None) or config.num_experts
        if moe + "experts.gate_up_proj" in tensors:  # transformers v5 in-memory layout
            out[dst + "ffn.experts.w13"] = take(moe + "experts.gate_up_proj").transpose(1, 2)  # [E, D, 2F]
            out[dst + "ffn.experts.w2"] = take(moe + "experts.down_proj").transpose(1, 2)  # [E, F, D]
        else:
            g, u, d = names
            out[dst + "ffn.experts.w13"] = torch.stack([
                torch.cat([take(f"{moe}experts.{e}.{g}.weight"), take(f"{moe}experts.{e}.{u}.weight")]).t()
                for e in range(E)])
            out[dst + "ffn.experts.w2"] = torch.stack([take(f"{moe}experts.{e}.{d}.weight").t() for e in range(E)])
        if FAMILIES[config.model_type].gated_shared_expert and getattr(config, "shared_expert_intermediate_size", 0):
            sh = moe + "shared_expert."
            out[dst + "ffn.shared.ffn.w13.weight"] = torch.cat([take(sh + "gate_proj.weight"), take(sh + "up_proj.weight")])
            out[dst + "ffn.shared.ffn.w2.weight"] = take(sh + "down_proj.weight")
            out[dst + "ffn.shared.gate.weight"] = take(moe + "shared_expert_gate.weight")
    unused = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        log.warning("ignored %d checkpoint tensors moestack does not use (first: %s)", len(unused), unused[0])
    return {k: v.contiguous() for k, v in out.items()}


def build_hf(config, tensors: Mapping[str, torch.Tensor], device="cpu", dtype: torch.dtype | None = None,
             max_len: int | None = None) -> ServeModel:
    """A ServeModel from a Hugging Face config and its tensors by name (a checkpoint's or a model's state_dict)."""
    spec = hf_spec(config, max_len)
    inv_freq, scale = hf_rope(config, spec.head_dim)
    with torch.device("meta"):
        model = ServeModel(spec, hf_blocks(config, spec), inv_freq, scale)
    state = map_hf_state(config, spec, tensors)
    dtype = dtype or next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("expert_bias") and not (spec.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _finish(model, spec, inv_freq, scale)
    return model.to(device=device).eval()


def _finish(model: ServeModel, spec: ModelSpec, inv_freq: torch.Tensor, scale: float = 1.0) -> None:
    """Re-create what stayed on the meta device: RoPE tables, zero buffers, the tied LM head."""
    angles = torch.outer(torch.arange(spec.max_len, dtype=torch.float32), inv_freq.float())
    model.rope_cos, model.rope_sin = angles.cos() * scale, angles.sin() * scale
    device = model.embed.weight.device
    for mod in model.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(mod, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    if spec.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"parameters {left[:5]} have no weights in the checkpoint")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (model.safetensors, or the shards its index names)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no safetensors weights (model.safetensors or shards); save the model with "
                         "save_pretrained(folder) (safe_serialization, the default)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{folder}: the shard {name} named by its index is missing")
        try:
            tensors.update(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{path}: cannot read the safetensors file ({err}); the checkpoint is truncated or corrupt") from err
    return tensors


def load_hf(folder: Path, device: str = "cpu", dtype: torch.dtype | None = None, max_len: int | None = None) -> Served:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"{folder}/config.json: transformers cannot read it ({err})") from err
    spec_check = hf_spec(config)  # unsupported families fail before any weight is read
    del spec_check
    model = build_hf(config, read_safetensors(folder), device, dtype, max_len)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError) as err:
        raise ValueError(f"{folder}: no tokenizer transformers can load ({err}); save one with "
                         "tokenizer.save_pretrained(folder)") from err
    tokenizer = Tokenizer(tok)

    def calib(batches: int, seq: int):
        return calib_from_text(tokenizer, batches, seq, device)

    return Served(model, tokenizer, str(folder), config.model_type, calib)


def calib_from_text(tokenizer: Tokenizer, batches: int, seq: int, device, rows: int = 4) -> list[torch.Tensor]:
    """Calibration batches [rows, seq] of the embedded corpus (Python's standard library source) in this tokenizer."""
    from moestack.data import stdlib_files

    ids: list[int] = []
    need = batches * rows * seq
    for path in stdlib_files():
        ids += tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= need:
            break
    t = torch.tensor(ids[:need], dtype=torch.long)
    return [b.view(rows, seq).to(device) for b in t.split(rows * seq)]
