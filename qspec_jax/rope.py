"""Rotary position embeddings with the scalings Llama-family checkpoints use.

Matches transformers' `modeling_rope_utils` for rope types default, linear, llama3, yarn
(rotate-half convention: the first and second halves of head_dim form the pairs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.config import LlamaConfig


def inv_frequencies(config: LlamaConfig) -> tuple[np.ndarray, float]:
    """-> (inv_freq float32 [head_dim/2], attention_factor applied to cos and sin)."""
    dim = config.head_dim
    base = config.rope_theta
    sc = config.rope_scaling
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if sc.rope_type == "default":
        return inv, 1.0
    if sc.rope_type == "linear":
        return inv / sc.factor, 1.0
    if sc.rope_type == "llama3":
        old = sc.original_max_position_embeddings
        low_wl, high_wl = old / sc.low_freq_factor, old / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / sc.factor, inv)
        smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if sc.rope_type == "yarn":
        return _yarn(inv, dim, base, sc)
    raise ValueError(f"unsupported rope type {sc.rope_type!r}")


def _yarn(inv, dim, base, sc):
    factor = sc.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = sc.attention_factor
    if attn is None:
        if sc.mscale and sc.mscale_all_dim:
            attn = mscale(factor, sc.mscale) / mscale(factor, sc.mscale_all_dim)
        else:
            attn = mscale(factor)

    def corr_dim(rot):
        return dim * math.log(sc.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(sc.beta_fast or 32), corr_dim(sc.beta_slow or 1)
    if sc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    interp_freq = inv / factor
    return (interp_freq * (1 - extrap) + inv * extrap).astype(np.float32), float(attn)


def rope_tables(config: LlamaConfig, positions):
    """positions int [...] -> (cos, sin) float32 [..., head_dim]."""
    inv, attn = inv_frequencies(config)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang) * attn, jnp.sin(ang) * attn


def apply_rope(x, cos, sin, *, exact: bool = False):
    """x [B, T, heads, D]; cos/sin [B, T, D]. Computed in float32, returns x.dtype.

    exact (ForwardOptions.exact_rows): round both products before the add."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    a, b = xf * cos[:, :, None, :], rot * sin[:, :, None, :]
    if exact:
        # XLA's CPU backend contracts a + b into an FMA, and which product it fused differed
        # between the autoregressive and the speculative program (1-ulp differences in the K
        # written to the cache; docs/design.md "Exactness on CPU"). Behind the barrier both
        # products are rounded and the add is a plain add in every program.
        a, b = jax.lax.optimization_barrier((a, b))
    return (a + b).astype(x.dtype)
