"""Small random models shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.config import LlamaConfig, RopeScaling


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_params(config: LlamaConfig, seed: int = 0, scale: float = 0.3):
    from qspec_jax.model import init_random_params

    return init_random_params(config, jax.random.PRNGKey(seed), jnp.float32, scale=scale)


def random_prompts(rng: np.random.Generator, lengths, vocab: int, width: int | None = None):
    """Right-padded prompts [B, width] (padding = random tokens: must not matter) + lengths."""
    width = max(lengths) if width is None else width
    toks = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
    return jnp.asarray(toks), jnp.asarray(lengths, jnp.int32)


LLAMA3_SCALING = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64)
