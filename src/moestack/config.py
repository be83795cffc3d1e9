"""Configuration: one frozen dataclass per concern, loaded from TOML, overridable from the command line.

Validation happens here, at the edge: every error is a `ConfigError` whose message names the key
and what is allowed, so the CLI can print one line and exit.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from moestack.checkpoint.config import CheckpointConfig

ARCHS = ("top2", "shared_top1", "scmoe")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
SCMOE_POSITIONS = ("prev_attn", "block_input")


class ConfigError(ValueError):
    """A malformed or impossible configuration; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only MoE transformer."""

    arch: str = "top2"  # top2 | shared_top1 | scmoe (see docs/methods/scmoe.md)
    vocab_size: int = 256  # byte-level tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    moe_every: int = 1  # an MoE FFN in every n-th layer, dense SwiGLU elsewhere
    dense_first: int = 0  # the first n layers use a dense FFN
    dense_d_ff: int = 0  # hidden size of dense FFNs; 0 = 2 * moe.d_ff
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    scmoe_position: str = "prev_attn"  # ScMoE shortcut source: prev_attn | block_input

    def validate(self) -> None:
        _choice("model.arch", self.arch, ARCHS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "moe_every", "rope_theta", "norm_eps"):
            _positive(f"model.{name}", getattr(self, name))
        if self.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={self.vocab_size} is below 256, the byte tokenizer's vocabulary; use >= 256")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                "choose n_heads among the divisors of d_model"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model.d_model / model.n_heads must be even for rotary embeddings")
        if not 0 <= self.dense_first < self.n_layers:
            raise ConfigError(f"model.dense_first={self.dense_first} must be in [0, n_layers={self.n_layers})")
        _choice("model.scmoe_position", self.scmoe_position, SCMOE_POSITIONS)
        if self.arch == "scmoe" and (self.moe_every != 1 or self.dense_first != 0):
            raise ConfigError("model.arch=scmoe needs model.moe_every=1 and model.dense_first=0")


@dataclass(frozen=True)
class MoEConfig:
    """The MoE layer: router, dispatcher, experts."""

    num_experts: int = 8
    top_k: int = 2  # used by arch=top2; shared_top1 and scmoe route top-1 plus a shared expert
    d_ff: int = 256  # hidden size of one expert
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing bias
    bias_update_rate: float = 0.001
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops tokens over capacity
    shared_experts: int = 0  # dense shared experts next to the routed ones (arch=top2)
    impl: str = "auto"  # auto | grouped_mm | loop

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "d_ff"):
            _positive(f"moe.{name}", getattr(self, name))
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}; use top_k <= num_experts"
            )
        _choice("moe.impl", self.impl, EXPERT_IMPLS)
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.shared_experts < 0:
            raise ConfigError(f"moe.shared_experts must be >= 0, got {self.shared_experts}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = 200
    batch_size: int = 8  # GLOBAL batch, in sequences
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    data: str = ""  # empty = the embedded default corpus (Python's standard library source)
    data_max_mb: int = 8  # read at most this many MiB of the corpus
    run_dir: str = ""  # empty = runs/<timestamp>

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "log_every", "data_max_mb"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"train.device={self.device!r}: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class ParallelConfig:
    """Expert and data parallelism over torchrun's ranks: world = dp * ep."""

    # 0 = auto: under torchrun, as many expert-parallel ranks as the world and moe.num_experts allow
    # (the largest divisor of both; with dp given, world // dp), data parallel over the rest
    ep: int = 0
    dp: int = 0  # 0 = world // ep
    placement: str = ""  # a moestack.placement/v1 JSON file; empty = contiguous (FSSDP: its initial owners)
    # "ep": each rank keeps E/ep experts and tokens travel to them; "fssdp": Hecate's fully sharded sparse
    # data parallelism (parallel/fssdp.py): experts owned once, hot ones copied to other ranks each step
    mode: str = "ep"
    fssdp_budget: int = 2  # copies of other ranks' experts a rank may materialize per MoE layer and step
    fssdp_window: int = 5  # steps of loads that predict the next step's (the paper's w)
    fssdp_reshard_every: int = 100  # steps between re-sharding from the loads since the last (0 = never)
    fssdp_rematerialize: bool = False  # Hecate-RM: drop the copies after forward, gather them again in backward

    def validate(self) -> None:
        _choice("parallel.mode", self.mode, ("ep", "fssdp"))
        if self.fssdp_budget < 0:
            raise ConfigError(f"parallel.fssdp_budget must be >= 0 (0 = no copies), got {self.fssdp_budget}")
        if self.fssdp_window < 1:
            raise ConfigError(f"parallel.fssdp_window must be >= 1 step, got {self.fssdp_window}")
        if self.fssdp_reshard_every < 0:
            raise ConfigError(f"parallel.fssdp_reshard_every must be >= 0 (0 = never), got {self.fssdp_reshard_every}")
        if self.ep < 0:
            raise ConfigError(f"parallel.ep must be >= 0 (0 = as many expert-parallel ranks as fit), got {self.ep}")
        if self.dp < 0:
            raise ConfigError(f"parallel.dp must be >= 0 (0 = world // ep), got {self.dp}")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; written to the run folder as config.toml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # the default run keeps async partial-expert checkpoints (MoC): every 50 steps, 2 experts per layer
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50, pec_k=2))

    def validate(self) -> "Config":
        for section in SECTIONS:
            for f in fields(getattr(self, section)):  # NaN passes every comparison below: refuse it first
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
            try:
                getattr(self, section).validate()
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.parallel.mode == "ep" and self.parallel.ep and self.moe.num_experts % self.parallel.ep:
            raise ConfigError(
                f"parallel.ep={self.parallel.ep} does not divide moe.num_experts={self.moe.num_experts}; "
                "choose ep among the divisors of num_experts, or --parallel.mode fssdp (any number of ranks)"
            )
        check_capacity(self, self.parallel.ep)
        if self.parallel.mode == "fssdp" and self.train.compile:
            raise ConfigError("train.compile is not supported with parallel.mode=fssdp (its per-step plans change "
                              "the expert shapes); drop --compile or use --parallel.mode ep")
        if self.parallel.mode == "fssdp" and self.moe.capacity_factor > 0:
            raise ConfigError("moe.capacity_factor > 0 is not supported with parallel.mode=fssdp (its dispatcher is "
                              "dropless); set moe.capacity_factor = 0")
        if self.checkpoint.pec_k > self.moe.num_experts:
            raise ConfigError(
                f"checkpoint.pec_k={self.checkpoint.pec_k} exceeds moe.num_experts={self.moe.num_experts}; "
                "use 0 (all experts) or at most num_experts"
            )
        return self


SECTIONS = tuple(f.name for f in fields(Config))


def check_capacity(cfg: "Config", ep: int) -> None:
    """A capacity factor needs the local dispatcher: refuse it with expert parallelism (ep > 1)."""
    if cfg.moe.capacity_factor > 0 and ep > 1:
        raise ConfigError(
            f"moe.capacity_factor > 0 is not supported with expert parallelism (ep = {ep}; the expert-parallel "
            "dispatcher is dropless); set moe.capacity_factor = 0, or --ep 1 for data parallelism only"
        )


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    """The fields of one config section, by name."""
    cls = type(getattr(Config(), section))
    return {f.name: f for f in fields(cls)}


def coerce(key: str, value: Any, typ: type, from_text: bool = True) -> Any:
    """Convert `value` to the field type, or raise ConfigError. Strings are parsed only when they come from a
    command line (`from_text`); a TOML file must give numbers and booleans as such."""
    if isinstance(value, str) and typ is not str and not from_text:
        raise ConfigError(f"{key} expects {typ.__name__}, got the string {value!r}; write it without quotes")
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{key} expects true or false, got {value!r}")
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise ConfigError(f"{key} expects {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _field_type(section: str, name: str) -> type:
    f = section_fields(section)[name]
    return {"int": int, "float": float, "str": str, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]


def apply_overrides(cfg: Config, overrides: dict[str, Any], from_text: bool = True) -> Config:
    """Return `cfg` with `{"section.field": value}` overrides applied (values coerced and checked; strings
    parsed as numbers or booleans only `from_text`, i.e. from a command line)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; sections are {', '.join(SECTIONS)}")
        known = section_fields(section)
        if name not in known:
            raise ConfigError(f"unknown config key {key!r}; {section} keys are {', '.join(known)}")
        sections.setdefault(section, {})[name] = coerce(key, value, _field_type(section, name), from_text)
    return replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into flat `{"section.field": value}` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    flat: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; sections are {', '.join(SECTIONS)}")
        for name, value in table.items():
            flat[f"{section}.{name}"] = value
    return flat


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file, then command-line overrides; validated."""
    cfg = Config()
    if path:
        values = load_toml(path)  # its errors name the file already
        try:
            cfg = apply_overrides(cfg, values, from_text=False)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return apply_overrides(cfg, overrides or {}).validate()


def to_toml(cfg: Config) -> str:
    """Serialise a config as TOML (flat sections of scalars, so no library is needed)."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
