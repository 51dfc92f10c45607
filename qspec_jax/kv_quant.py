"""Hierarchical INT4/INT8 quantization of KV groups (QuantSpec, arXiv 2502.10424).

For each group X of G values: mn = min(X), s = (max(X) - mn) / 15
  U = round(clip((X - mn) / s, 0, 15))                      upper plane, 0..15
  L = round(clip((X - (U*s + mn)) / (s/16), -8, 7)) + 8      lower plane, stored 0..15
  draft  reads X4 = U*s + mn
  target reads X8 = U*s + (L - 8) * s/16 + mn
Only s and mn are stored (float16). Codes are computed from the float16-rounded s and mn
so that dequantization sees exactly the numbers quantization used.

Packing (both planes): along head_dim D, byte j holds channel j in its low nibble and
channel j + D/2 in its high nibble, so a kernel computes q.k as two aligned half dots.

Keys are quantized per channel over groups of G consecutive tokens; values per token over
groups of `value_group` consecutive channels (the whole head when head_dim <= G).
"""

from __future__ import annotations

import jax.numpy as jnp

SCALE_DTYPE = jnp.float16


def quantize_groups(x, axis: int):
    """Hierarchically quantize `x` with one group spanning all of `axis`.

    Returns (upper, lower, scale, minimum): codes as uint8 in 0..15 with x's shape,
    scale and minimum float16 with `axis` kept as size 1.
    """
    x = x.astype(jnp.float32)
    mn = jnp.min(x, axis=axis, keepdims=True).astype(SCALE_DTYPE)
    mx = jnp.max(x, axis=axis, keepdims=True)
    s = ((mx - mn.astype(jnp.float32)) / 15.0).astype(SCALE_DTYPE)
    s32, mn32 = s.astype(jnp.float32), mn.astype(jnp.float32)
    # A constant group has s == 0: every code is 0 (upper) / 8 (lower), value == mn.
    safe = jnp.where(s32 > 0, s32, 1.0)
    upper = jnp.round(jnp.clip((x - mn32) / safe, 0.0, 15.0))
    upper = jnp.where(s32 > 0, upper, 0.0)
    resid = x - (upper * s32 + mn32)
    lower = jnp.round(jnp.clip(resid / (safe / 16.0), -8.0, 7.0))
    lower = jnp.where(s32 > 0, lower, 0.0) + 8.0
    return upper.astype(jnp.uint8), lower.astype(jnp.uint8), s, mn


def pack_halves(codes):
    """[..., D] codes 0..15 -> [..., D/2] uint8: channel j low nibble, j + D/2 high."""
    d = codes.shape[-1]
    lo, hi = codes[..., : d // 2], codes[..., d // 2 :]
    return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_halves(packed):
    """Inverse of `pack_halves`: [..., D/2] uint8 -> [..., D] codes (uint8)."""
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=-1)


def dequantize(upper, lower, scale, minimum):
    """Codes (unpacked) and broadcastable scale/min -> float32 values.

    `lower=None` gives the draft's 4-bit view.
    """
    s = scale.astype(jnp.float32)
    x = upper.astype(jnp.float32) * s + minimum.astype(jnp.float32)
    if lower is not None:
        x = x + (lower.astype(jnp.float32) - 8.0) * (s / 16.0)
    return x


def value_group_size(head_dim: int, group_size: int) -> int:
    """Channels per value group: G, or the whole head when head_dim <= G."""
    if head_dim <= group_size:
        return head_dim
    if head_dim % group_size:
        raise ValueError(f"head_dim={head_dim} is not a multiple of the KV group size {group_size}")
    return group_size


def quantize_keys(k, group_size: int):
    """Keys [..., T, D] with T a multiple of G -> packed planes and per-channel stats.

    Returns upper, lower: uint8 [..., T, D/2]; scale, minimum: f16 [..., T/G, D].
    """
    *lead, t, d = k.shape
    g = k.reshape(*lead, t // group_size, group_size, d)
    u, l, s, mn = quantize_groups(g, axis=-2)
    u = u.reshape(*lead, t, d)
    l = l.reshape(*lead, t, d)
    return pack_halves(u), pack_halves(l), s[..., 0, :], mn[..., 0, :]


def quantize_values(v, group_size: int):
    """Values [..., T, D] -> packed planes uint8 [..., T, D/2], stats f16 [..., T, D/Gv]."""
    *lead, t, d = v.shape
    gv = value_group_size(d, group_size)
    g = v.reshape(*lead, t, d // gv, gv)
    u, l, s, mn = quantize_groups(g, axis=-1)
    u = u.reshape(*lead, t, d)
    l = l.reshape(*lead, t, d)
    return pack_halves(u), pack_halves(l), s[..., 0], mn[..., 0]


def values_token_minor(planes, group_size: int):
    """Value planes [..., T, D/2] -> the cache's layout [..., T/G, D/2, G] (T a multiple of G).

    Attention contracts values over tokens: with a group's tokens contiguous per channel
    byte, a GPU kernel reads consecutive tokens of one channel as 16-bit pairs (the tensor
    core's B operand) instead of byte by byte (Nsight, H100 session 6: 64 one-byte
    shared-memory loads per thread per tile). Blocks of G tokens keep the flush, which
    writes one whole group, a write of one contiguous block (session 6's plain token-minor
    [.., D/2, T] layout made XLA transpose the planes inside the decode loop)."""
    *lead, t, h = planes.shape
    return jnp.swapaxes(planes.reshape(*lead, t // group_size, group_size, h), -1, -2)


def values_token_major(planes):
    """The inverse of `values_token_minor`: [..., T/G, D/2, G] -> [..., T, D/2]."""
    *lead, ng, h, g = planes.shape
    return jnp.swapaxes(planes, -1, -2).reshape(*lead, ng * g, h)


def dequantize_keys(upper, lower, scale, minimum, group_size: int):
    """Packed keys [..., T, D/2] + stats [..., T/G, D] -> float32 [..., T, D].

    `lower=None` reads the upper plane only (the draft's view).
    """
    u = unpack_halves(upper)
    l = None if lower is None else unpack_halves(lower)
    s = jnp.repeat(scale, group_size, axis=-2)
    mn = jnp.repeat(minimum, group_size, axis=-2)
    return dequantize(u, l, s, mn)


def dequantize_values(upper, lower, scale, minimum):
    """Packed values [..., T, D/2] + stats [..., T, D/Gv] -> float32 [..., T, D]."""
    u = unpack_halves(upper)
    l = None if lower is None else unpack_halves(lower)
    d = u.shape[-1]
    reps = d // scale.shape[-1]
    s = jnp.repeat(scale, reps, axis=-1)
    mn = jnp.repeat(minimum, reps, axis=-1)
    return dequantize(u, l, s, mn)
