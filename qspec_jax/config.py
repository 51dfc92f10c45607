"""Model configuration read from a Hugging Face `config.json`.

`LlamaConfig` is frozen and hashable so it can be a static argument of `jax.jit`.
Both the transformers v4 layout (`rope_theta` + `rope_scaling`) and the v5 layout
(`rope_parameters`) are understood.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A config.json that this project cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture of a Llama-family model (Llama 2/3/3.1/3.2, SmolLM2, Qwen2).

    Frozen and hashable: pass it as a static argument (`static_argnames=("config", ...)`).
    Shapes it fixes: embed [vocab_size, hidden_size]; per layer wq [hidden_size,
    num_heads*head_dim], wk/wv [hidden_size, num_kv_heads*head_dim], w_gate/w_up
    [hidden_size, intermediate_size]; KV cache [B, num_kv_heads, capacity, head_dim].
    Build it with `LlamaConfig.from_json_file(hf_dir / "config.json")` or get it from
    `load_model`; eos_token_ids is the default stop set of the decoders.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Inverse of `to_dict` (our own serialization, not HF's)."""
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict of a Hugging Face `config.json`."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if archs:
            arch = archs[0]
        elif model_type == "llama":
            arch = "LlamaForCausalLM"
        elif model_type == "qwen2":
            arch = "Qwen2ForCausalLM"
        else:
            arch = f"<model_type={model_type!r}>"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"config.json lacks required key {key!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu'")
        if hf.get("mlp_bias", False):
            raise ConfigError("mlp_bias=True is not supported")

        num_heads = hf["num_attention_heads"]
        num_kv = hf.get("num_key_value_heads") or num_heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta, scaling = _read_rope(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        bias = hf.get("attention_bias", arch == "Qwen2ForCausalLM")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if arch == "Qwen2ForCausalLM" else 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            attention_bias=bool(bias),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            return cls.from_hf(json.load(f))


_SCALING_KEYS = {f.name for f in dataclasses.fields(RopeScaling)}


def _read_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Return (rope_theta, RopeScaling) from either transformers v4 or v5 keys."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params = dict(params)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    unknown = set(params) - _SCALING_KEYS - {"partial_rotary_factor"}
    if unknown:
        raise ConfigError(f"unsupported rope_scaling keys for {rope_type!r}: {sorted(unknown)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1.0 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "yarn" and params.get("factor") is None and params.get("original_max_position_embeddings"):
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    if rope_type in ("linear", "llama3", "yarn") and params.get("factor") is None:
        raise ConfigError(f"rope_scaling of type {rope_type!r} needs 'factor'")
    if rope_type in ("llama3",) and "original_max_position_embeddings" not in params:
        raise ConfigError("rope_scaling of type 'llama3' needs 'original_max_position_embeddings'")
    if rope_type == "yarn" and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    return theta, RopeScaling(rope_type=rope_type, **params)
