"""Turning logits into tokens: greedy, temperature, top-k, top-p.

`SamplingParams` is frozen (a static jit argument). `filtered_logits` gives the
distribution a sampler draws from; speculative decoding applies the same function to
draft and target logits so that both sides of the acceptance test agree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn from float32 logits [B, V] (frozen: a static jit argument).

    temperature 0 (default, `GREEDY`) takes the argmax; > 0 samples softmax(logits / T)
    after top_k (0 = off) and top_p (1 = off) filtering. With sampling, speculative
    decoding keeps the target's distribution exactly (speculative sampling).
    """

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def filtered_logits(logits, sp: SamplingParams):
    """float32 [..., V] -> logits with temperature applied and filtered tokens at -inf."""
    x = logits.astype(jnp.float32) / (sp.temperature if sp.temperature > 0 else 1.0)
    if sp.top_k > 0 and sp.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
        x = jnp.where(x < kth, NEG_INF, x)
    if sp.top_p < 1.0:
        srt = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < sp.top_p  # the smallest prefix reaching top_p (never empty)
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, NEG_INF, x)
    return x


def probabilities(logits, sp: SamplingParams):
    """Distribution the sampler draws from; one-hot argmax when greedy."""
    if sp.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits, sp), axis=-1)


def sample(key, logits, sp: SamplingParams):
    """logits [..., V] -> int32 tokens [...]."""
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, sp), axis=-1).astype(jnp.int32)
