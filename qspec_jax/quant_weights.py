"""INT4 group-wise weights for the draft.

A `QuantizedWeight` stands in for a `[in, out]` matrix anywhere the model calls
`linear`. Asymmetric round-to-nearest per group of `group_size` consecutive input rows:
  w ~= code * scale + minimum,   code in 0..15
Layout (group-local nibble packing, so a kernel reads one group as one tile):
  packed  uint8 [n_groups * group_size/2, out]: byte j of group g holds row g*G + j in
          its low nibble and row g*G + j + G/2 in its high nibble
  scale   float16 [n_groups, out]
  minimum float16 [n_groups, out]
An input dimension that G does not divide is zero-padded to n_groups*G (a ragged last
group); padded rows never enter the group's min/max and meet zero activations.
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

    packed: jax.Array  # uint8 [n_groups * G/2, out]
    scale: jax.Array  # float16 [n_groups, out]
    minimum: jax.Array  # float16 [n_groups, out]
    in_features: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.packed.shape[-1])

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
    """codes uint8 [n_groups*G, out] (0..15) -> QuantizedWeight in the packed layout."""
    kp, n = codes.shape
    g = codes.reshape(kp // group_size, group_size, n)
    half = group_size // 2
    packed = (g[:, :half] | (g[:, half:] << 4)).astype(jnp.uint8).reshape(kp // 2, n)
    return QuantizedWeight(packed=packed, scale=jnp.asarray(scale, STAT_DTYPE),
                           minimum=jnp.asarray(minimum, STAT_DTYPE),
                           in_features=in_features, group_size=group_size)


def unpack_codes(qw: QuantizedWeight):
    """-> uint8 codes [n_groups*G, out]."""
    half = qw.group_size // 2
    n = qw.packed.shape[-1]
    p = qw.packed.reshape(-1, half, n)
    return jnp.concatenate([p & 0xF, p >> 4], axis=1).reshape(-1, n)


def dequantize_weight(qw: QuantizedWeight, dtype=jnp.float32):
    """-> [in, out] dense weights."""
    codes = unpack_codes(qw).astype(jnp.float32)
    g = codes.reshape(-1, qw.group_size, codes.shape[-1])
    w = g * qw.scale.astype(jnp.float32)[:, None] + qw.minimum.astype(jnp.float32)[:, None]
    return w.reshape(-1, codes.shape[-1])[: qw.in_features].astype(dtype)


def weight_bytes(tree) -> int:
    """Bytes of every array in a params pytree (QuantizedWeight counted packed)."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
