"""INT4 group-wise weights for the draft.

A `QuantizedWeight` stands in for a `[in, out]` matrix anywhere the model calls
`linear`. Asymmetric round-to-nearest per group of `group_size` consecutive input rows:
  w ~= code * scale + minimum,   code in 0..15
Layout: K-major (each output column's codes are contiguous), group-local nibble packing:
  packed  uint8 [out, n_groups, G/2]: byte j of group g of output column n holds input
          row g*G + j in its low nibble and row g*G + G/2 + j in its high nibble
  scale   float16 [out, n_groups]
  minimum float16 [out, n_groups]
K-major because decode is a GEMV: the INT4 kernel (`pallas_kernels.int4_matmul`) reduces
along the contiguous axis, in-thread and across a warp, and keeps a small accumulator.
An input dimension that G does not divide is zero-padded to n_groups*G (a ragged last
group); padded rows never enter the group's min/max and meet zero activations.
Quantizers (`_rtn_codes`, `qspec_jax.gptq`) work in the [in, out] orientation (codes
[n_groups*G, out], stats [n_groups, out]); `pack_weight` transposes into the layout and
`unpack_codes` / `dequantize_weight` give that orientation back.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

STAT_DTYPE = jnp.float16


@flax.struct.dataclass
class QuantizedWeight:
    """An INT4 weight [in_features, out] (a pytree leaf group): two 4-bit codes per byte,
    asymmetric per group of `group_size` input rows: w ~ code * scale + minimum."""

    packed: jax.Array  # uint8 [out, n_groups, G/2]
    scale: jax.Array  # float16 [out, n_groups]
    minimum: jax.Array  # float16 [out, n_groups]
    in_features: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.packed.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.packed.size + 2 * self.scale.size + 2 * self.minimum.size)


def check_group_size(group_size: int) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"weight group size must be an even number >= 2, got {group_size}")


def quantize_rtn(w, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest asymmetric INT4 quantization of w [in, out]."""
    check_group_size(group_size)
    codes, scale, minimum = _rtn_codes(jnp.asarray(w, jnp.float32), group_size)
    return pack_weight(codes, scale, minimum, w.shape[0], group_size)


def _rtn_codes(w, group_size):
    k, n = w.shape
    ng = -(-k // group_size)
    pad = ng * group_size - k
    valid = jnp.arange(ng * group_size) < k
    wp = jnp.pad(w, ((0, pad), (0, 0))).reshape(ng, group_size, n)
    vmask = valid.reshape(ng, group_size, 1)
    mn = jnp.min(jnp.where(vmask, wp, jnp.inf), axis=1).astype(STAT_DTYPE)
    mx = jnp.max(jnp.where(vmask, wp, -jnp.inf), axis=1)
    s = ((mx - mn.astype(jnp.float32)) / 15.0).astype(STAT_DTYPE)
    s32 = s.astype(jnp.float32)[:, None, :]
    safe = jnp.where(s32 > 0, s32, 1.0)
    codes = jnp.round(jnp.clip((wp - mn.astype(jnp.float32)[:, None, :]) / safe, 0, 15))
    codes = jnp.where(vmask & (s32 > 0), codes, 0).astype(jnp.uint8)
    return codes.reshape(ng * group_size, n), s, mn


def pack_weight(codes, scale, minimum, in_features: int, group_size: int) -> QuantizedWeight:
    """codes uint8 [n_groups*G, out] (0..15), scale / minimum [n_groups, out] (the
    quantizers' [in, out] orientation) -> QuantizedWeight in the K-major packed layout."""
    kp, n = codes.shape
    ng = kp // group_size
    half = group_size // 2
    scale = jnp.asarray(scale, STAT_DTYPE)
    minimum = jnp.asarray(minimum, STAT_DTYPE)
    if kp != ng * group_size or scale.shape != (ng, n) or minimum.shape != (ng, n):
        raise ValueError(f"pack_weight: codes {tuple(codes.shape)} must be [n_groups*{group_size}, out] and "
                         f"scale/minimum [n_groups, out], got {tuple(scale.shape)}, {tuple(minimum.shape)}")
    g = jnp.asarray(codes, jnp.uint8).reshape(ng, group_size, n)
    packed = (g[:, :half] | (g[:, half:] << 4)).astype(jnp.uint8)  # [ng, G/2, out]
    return QuantizedWeight(packed=jnp.transpose(packed, (2, 0, 1)), scale=scale.T, minimum=minimum.T,
                           in_features=in_features, group_size=group_size)


def _codes_out_major(qw: QuantizedWeight):
    """-> uint8 codes [out, n_groups, G]."""
    p = qw.packed
    return jnp.concatenate([p & 0xF, p >> 4], axis=-1)


def unpack_codes(qw: QuantizedWeight):
    """-> uint8 codes [n_groups*G, out]."""
    c = _codes_out_major(qw)
    return c.reshape(c.shape[0], -1).T


def dequantize_weight(qw: QuantizedWeight, dtype=jnp.float32, *, out_major: bool = False):
    """-> [in, out] dense weights ([out, in] with out_major=True: the layout's own
    orientation, no transpose)."""
    c = _codes_out_major(qw).astype(jnp.float32)  # [out, ng, G]
    w = c * qw.scale.astype(jnp.float32)[..., None] + qw.minimum.astype(jnp.float32)[..., None]
    w = w.reshape(w.shape[0], -1)[:, : qw.in_features].astype(dtype)
    return w if out_major else w.T


def weight_bytes(tree) -> int:
    """Bytes of every array in a params pytree (QuantizedWeight counted packed)."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
