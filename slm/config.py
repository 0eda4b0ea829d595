"""Model configuration: one dataclass that describes every architectural choice, and named presets.

The config stored in a checkpoint is the config the model was built from, so it must round-trip
through JSON exactly. The per-layer attention types are derived from a pattern by default but are
always stored explicitly, so a checkpoint never depends on how the pattern is interpreted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
LAYER_TYPES = (SLIDING, GLOBAL)

GPT2_VOCAB_SIZE = 50257

# Upper bounds on what a config (a preset, a flag or a config.json from disk) may ask for. They are
# far above anything this project trains (Gemma 3 270M: 18 layers, width 640, 262k vocabulary,
# 32k context) and far below what would exhaust a machine before a clear message could be given.
MAX_SIZES = {
    "vocab_size": 1_048_576,
    "context_length": 131_072,
    "hidden_size": 16_384,
    "num_layers": 512,
    "num_heads": 512,
    "num_kv_heads": 512,
    "head_dim": 1024,
    "intermediate_size": 131_072,
    "sliding_window": 131_072,
}
MAX_PARAMETERS = 20_000_000_000


def layer_types_from_pattern(num_layers: int, pattern: int) -> list[str]:
    """Every `pattern`-th layer (1-based) is global, the others slide: Gemma 3's 5:1 interleave."""
    if pattern < 1:
        raise ValueError(f"sliding_window_pattern must be at least 1, got {pattern}")
    return [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


@dataclass
class ModelConfig:
    """Every architectural choice of the Gemma 3 decoder."""

    vocab_size: int = GPT2_VOCAB_SIZE
    context_length: int = 1024  # the longest sequence the model is trained on / generates into
    hidden_size: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 2048
    sliding_window: int = 512  # a query at i sees keys j with i - W < j <= i
    sliding_window_pattern: int = 6
    layer_types: list[str] = field(default_factory=list)  # derived from the pattern when empty
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by this ** -0.5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._validate_sizes()  # before anything is derived from them (a list of num_layers entries)
        if not self.layer_types:
            self.layer_types = layer_types_from_pattern(self.num_layers, self.sliding_window_pattern)
        self.layer_types = list(self.layer_types)
        self.validate()

    def _validate_sizes(self) -> None:
        for name, maximum in MAX_SIZES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
            if value > maximum:
                raise ValueError(f"ModelConfig.{name} is {value:,}; this project allows at most {maximum:,}")
        if not isinstance(self.sliding_window_pattern, int) or isinstance(self.sliding_window_pattern, bool):
            raise ValueError(f"sliding_window_pattern must be an integer, got {self.sliding_window_pattern!r}")
        if not isinstance(self.layer_types, (list, tuple)):
            raise ValueError(f"layer_types must be a list, got {type(self.layer_types).__name__}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        for name in ("rope_local_base", "rope_global_base", "rms_norm_eps", "query_pre_attn_scalar", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ModelConfig.{name} must be a finite number, got {value!r}")

    def validate(self) -> None:
        """Reject configurations that cannot build a working model, with a message saying why."""
        self._validate_sizes()
        total = count_parameters(self).total
        if total > MAX_PARAMETERS:
            raise ValueError(f"this config has {total:,} parameters; this project allows at most {MAX_PARAMETERS:,}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"unknown layer types {unknown}; expected {list(LAYER_TYPES)}")
        for name in ("rope_local_base", "rope_global_base", "rms_norm_eps", "query_pre_attn_scalar", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())


# Presets. Each is a function so that callers get a fresh, mutable config.
PRESETS: dict[str, dict[str, Any]] = {
    # Gemma 3 270M's dimensions with the GPT-2 vocabulary (132.5M parameters; Gemma's own 262k-token
    # vocabulary is what makes it "270M").
    "gemma3-270m": dict(
        context_length=1024, hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1,
        head_dim=256, intermediate_size=2048, sliding_window=512, sliding_window_pattern=6,
    ),
    # A strong TinyStories model for one consumer GPU in under an hour: ~56M parameters, of which
    # 30M are in the blocks. At ~6*56M FLOPs per token it sees ~600M tokens (1.3 epochs of
    # TinyStories) in an hour at 60 TFLOP/s, which is what 33M-class TinyStories models need to write
    # coherent stories. Window 256 at context 512, a global layer every 4th.
    "small": dict(
        context_length=512, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
        head_dim=64, intermediate_size=2048, sliding_window=256, sliding_window_pattern=4,
    ),
    # Trains visibly on a 2-core CPU in minutes. The 50k-token embedding holds most parameters (9.6M
    # of 11.8M at width 192) but little of a step's time (the training loss runs over the ids the
    # text uses), so width 192 is where learning per CPU second peaks (bench/QUALITY.md); window 64 at
    # context 256 so the sliding layers really slide.
    "tiny": dict(
        context_length=256, hidden_size=192, num_layers=4, num_heads=3, num_kv_heads=1,
        head_dim=64, intermediate_size=768, sliding_window=64, sliding_window_pattern=2, init_std=0.04,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh config for a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    if "num_layers" in overrides or "sliding_window_pattern" in overrides:
        values.pop("layer_types", None)
    return ModelConfig(**values)


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int  # token embedding, plus the output head when it is not tied
    non_embedding: int


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Parameter counts computed from the config alone (no model is built)."""
    d, h = config.hidden_size, config.head_dim
    attention = d * config.num_heads * h * 2 + d * config.num_kv_heads * h * 2 + 2 * h  # q, o, k, v, qk-norms
    mlp = 3 * d * config.intermediate_size
    norms = 4 * d
    blocks = config.num_layers * (attention + mlp + norms) + d  # + final norm
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return ParameterCount(total=blocks + embedding, embedding=embedding, non_embedding=blocks)
