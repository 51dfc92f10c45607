"""Attention of new tokens over the hierarchical quantized KV cache plus its buffer.

One layer's cache (see `qspec_jax.hier_cache`):
  k_upper, k_lower  uint8 [B, KVH, Sq, D/2]   key planes (channel j low nibble, j+D/2 high)
  k_scale, k_min    f16   [B, KVH, Sq/G, D]   per channel, per group of G tokens
  v_upper, v_lower  uint8 [B, KVH, Sq, D/2]
  v_scale, v_min    f16   [B, KVH, Sq, D/Gv]  per token, per group of Gv channels
  buf_k, buf_v      [B, KVH, Sb, D]           full precision, slot i = position buf_start+i

The view of a query depends on its position p alone, which is what makes speculative
decoding lossless against autoregressive decoding over the same cache: with n = p + 1,
  Q(n) = G * max(0, n // G - 1)
tokens [0, Q) are read from the quantized planes and tokens [Q, p] from the buffer.
`use_lower=False` is the draft (upper plane only), True the target (INT8).
"""

from __future__ import annotations

import jax.numpy as jnp

from qspec_jax import kv_quant

NEG_INF = -1e30


def quantized_prefix(positions, group_size: int):
    """Q(p + 1): how many leading tokens a query at position p reads from the planes."""
    n = positions + 1
    return group_size * jnp.maximum(n // group_size - 1, 0)


def hier_attention_reference(q, k_upper, k_lower, k_scale, k_min, v_upper, v_lower, v_scale,
                             v_min, buf_k, buf_v, positions, buf_start, *, group_size: int,
                             use_lower: bool, sm_scale: float | None = None):
    """q [B, T, H, D], positions [B, T] int32, buf_start [B] int32 -> [B, T, H, D] (q.dtype)."""
    b, t, h, d = q.shape
    kvh, sq = k_upper.shape[1], k_upper.shape[2]
    sb = buf_k.shape[2]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    kl = k_lower if use_lower else None
    vl = v_lower if use_lower else None
    kq = kv_quant.dequantize_keys(k_upper, kl, k_scale, k_min, group_size)  # [B,KVH,Sq,D]
    vq = kv_quant.dequantize_values(v_upper, vl, v_scale, v_min)
    qf = q.astype(jnp.float32).reshape(b, t, kvh, h // kvh, d) * sm_scale
    s_q = jnp.einsum("btkgd,bksd->bkgts", qf, kq)
    s_b = jnp.einsum("btkgd,bksd->bkgts", qf, buf_k.astype(jnp.float32))
    qlen = quantized_prefix(positions, group_size)  # [B, T]
    j = jnp.arange(sq)
    mask_q = j[None, None, :] < qlen[:, :, None]  # [B, T, Sq]
    abs_pos = buf_start[:, None] + jnp.arange(sb)[None, :]  # [B, Sb]
    mask_b = (abs_pos[:, None, :] >= qlen[:, :, None]) & (abs_pos[:, None, :] <= positions[:, :, None])
    s_q = jnp.where(mask_q[:, None, None], s_q, NEG_INF)
    s_b = jnp.where(mask_b[:, None, None], s_b, NEG_INF)
    m = jnp.maximum(s_q.max(-1), s_b.max(-1))[..., None]
    p_q, p_b = jnp.exp(s_q - m), jnp.exp(s_b - m)
    denom = p_q.sum(-1) + p_b.sum(-1)
    o = jnp.einsum("bkgts,bksd->bkgtd", p_q, vq) + jnp.einsum("bkgts,bksd->bkgtd", p_b, buf_v.astype(jnp.float32))
    o = o / denom[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
