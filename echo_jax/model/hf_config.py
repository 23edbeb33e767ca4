"""A Hugging Face checkpoint's `config.json`, read strictly: Qwen3 and Llama decoders only.

Every field is either used, known to be harmless (ids, bookkeeping), or checked to hold the
value this code implements; anything else is refused with its name, so a checkpoint whose
architecture differs in a way nobody looked at fails loudly instead of loading wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from echo_jax.util.choices import ConfigError

MODEL_TYPES = ("qwen3", "llama")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}

# Fields that do not change the forward pass (token ids, generation and bookkeeping settings).
_IGNORED = {
    "architectures",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "max_position_embeddings",
    "max_window_layers",
    "sliding_window",
    "layer_types",
    "_name_or_path",
    "model_type",
    "torch_dtype",
    "dtype",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tie_word_embeddings",
    "rope_parameters",
}
# Fields whose value must be the one given: this code implements that case only.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0.0, 0),
    "use_sliding_window": (False,),
    "pretraining_tp": (1,),
}
_USED = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
}


@dataclasses.dataclass(frozen=True)
class HFConfig:
    model_type: str  # "qwen3" (per-head q/k RMSNorm) or "llama".
    vocab_size: int  # Rows of the embedding and the output projection.
    hidden_size: int  # D: the residual stream.
    intermediate_size: int  # F: the SwiGLU hidden width.
    num_hidden_layers: int  # Decoder blocks.
    num_attention_heads: int  # N: query heads.
    num_key_value_heads: int  # K: key/value heads (grouped-query attention: N % K == 0).
    head_dim: int  # H: per-head width (Qwen3 sets it; Llama's is D / N).
    rms_norm_eps: float  # Epsilon of every RMSNorm.
    rope_theta: float  # Rotary base.
    tie_word_embeddings: bool  # Output projection = embedding transposed.
    dtype: str  # Compute and parameter dtype: "float32" or "bfloat16".
    # Llama 3 rope scaling (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None.
    rope_scaling: tuple[float, float, float, float] | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"


def _rope_scaling(d: dict[str, Any] | None) -> tuple[float, float, float, float] | None:
    if d is None:
        return None
    kind = d.get("rope_type", d.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"config field rope_scaling: rope_type {kind!r} is not supported "
                          "(only 'llama3' or none)")  # fmt: skip
    unknown = sorted(set(d) - {"rope_type", "type", "rope_theta", "factor", "low_freq_factor",
                               "high_freq_factor", "original_max_position_embeddings"})  # fmt: skip
    if unknown:
        raise ConfigError(f"config field rope_scaling.{unknown[0]} is not supported")
    return (float(d["factor"]), float(d["low_freq_factor"]), float(d["high_freq_factor"]),
            float(d["original_max_position_embeddings"]))  # fmt: skip


def parse_config(raw: dict[str, Any], dtype: str | None = None) -> HFConfig:
    """An HFConfig from config.json's dict; `dtype` overrides the checkpoint's own."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"config field model_type={model_type!r} is not supported (only {MODEL_TYPES})"
        )
    for key, value in raw.items():
        if key in _REQUIRED_VALUES:
            if value not in _REQUIRED_VALUES[key]:
                raise ConfigError(
                    f"config field {key}={value!r} is not supported (only {_REQUIRED_VALUES[key]})"
                )
        elif key not in _IGNORED and key not in _USED:
            raise ConfigError(f"config field {key}={value!r} is not supported by this loader")
    layer_types = set(raw.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ConfigError(f"config field layer_types={sorted(layer_types)} is not supported "
                          "(only full_attention)")  # fmt: skip
    rope = raw.get("rope_parameters") or {}
    rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10_000.0))
    scaling = raw.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = rope
    src_dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = dtype or DTYPES.get(src_dtype)
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config field torch_dtype={src_dtype!r} is not supported")
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(
            f"config field num_key_value_heads={kv_heads} does not divide "
            f"num_attention_heads={heads}"
        )
    head_dim = int(raw.get("head_dim") or raw["hidden_size"] // heads)
    if head_dim % 2:
        raise ConfigError(f"config field head_dim={head_dim} must be even (rotary embeddings)")
    return HFConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),  # Both classes' default.
        dtype=dtype,
        rope_scaling=_rope_scaling(scaling),
        raw=dict(raw),
    )


def read_config(folder: str | os.PathLike, dtype: str | None = None) -> HFConfig:
    with open(os.path.join(folder, "config.json")) as f:
        return parse_config(json.load(f), dtype)
