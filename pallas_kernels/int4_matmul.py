"""INT4 group-wise weight matmul: y[M, N] = x[M, K] @ W, W in the QuantizedWeight layout.

See `qspec_jax.quant_weights` for the layout. `int4_matmul_reference` is plain `jnp` and
runs anywhere; it is what the kernel is tested against.

`int4_matmul` is a Pallas GPU kernel (Pallas-Triton lowering) for small M (decode):
each program owns `block_n` output columns and a range of K groups (split-K), and
streams the packed bytes one group tile `[G/2, block_n]` at a time:
  lo = byte & 0xF (rows g*G + j), hi = byte >> 4 (rows g*G + G/2 + j)
  d  = x_lo_g . lo + x_hi_g . hi                     (two tensor-core dots, f32 acc)
  y += d * scale_g + (sum x_g) * min_g
The codes never reach memory as floats. With 16-bit activations the nibbles become
floats by bit tricks, not conversions ("magic": bf16 bits 0x4300|c == 128 + c, f16
bits 0x6400|c == 1024 + c); the offset is removed exactly through the group's x-sum.
Split-K partials `[splits, M, N]` (f32) are summed by XLA.

`int4_linear` is the dispatcher a model calls with a `QuantizedWeight`.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Pallas-Triton is deprecated in jax 0.11 but present; only needed on GPU.
    from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover
    plgpu = None


def int4_matmul_reference(x, packed, scale, minimum, *, group_size: int):
    """x [M, K] (K <= n_groups*G), packed uint8 [n_groups*G/2, N], scale/min f16 [n_groups, N].

    Per-group dots, then scale: y = sum_g (x_g . c_g) * s_g + (sum x_g) * mn_g.
    Accumulates in float32, returns x.dtype.
    """
    m, k = x.shape
    half = group_size // 2
    ng, n = scale.shape
    p = packed.reshape(ng, half, n)
    codes = jnp.concatenate([p & 0xF, p >> 4], axis=1).astype(jnp.float32)  # [ng, G, N]
    xg = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, ng * group_size - k))).reshape(m, ng, group_size)
    dots = jnp.einsum("mgk,gkn->mgn", xg, codes)
    y = dots * scale.astype(jnp.float32) + jnp.sum(xg, axis=-1)[..., None] * minimum.astype(jnp.float32)
    return jnp.sum(y, axis=1).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
MAX_M = 64  # rows the kernel takes (decode / verify); larger M is prefill, use XLA
NUM_SMS_H100 = 132
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


class Int4ShapeError(ValueError):
    """Inputs the Pallas INT4 matmul does not take (raised before any launch)."""


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def compute_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return dtype
    return jnp.dtype(jnp.float32)


def auto_split_k(n_groups: int, n_blocks: int, gpi: int, target_programs: int = 2 * NUM_SMS_H100) -> int:
    """Splits of the K groups so that n_blocks * splits reaches about target_programs."""
    if n_blocks >= target_programs:
        return 1
    want = -(-target_programs // n_blocks)
    max_splits = max(1, n_groups // gpi)
    splits = max(1, min(want, max_splits))
    gps = -(-(-(-n_groups // splits)) // gpi) * gpi  # groups per split, multiple of gpi
    return -(-n_groups // gps)


def check_int4_matmul_args(x_shape, packed_shape, scale_shape, min_shape, group_size, block_n, block_k,
                           split_k=None):
    """Raise Int4ShapeError if the kernel cannot take these shapes / block sizes."""
    if len(x_shape) != 2:
        raise Int4ShapeError(f"x must be [M, K], got shape {tuple(x_shape)}")
    m, k = x_shape
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise Int4ShapeError(f"group_size {group_size} not supported by the Pallas kernel "
                             f"(supported: {SUPPORTED_GROUP_SIZES})")
    if len(scale_shape) != 2 or tuple(min_shape) != tuple(scale_shape):
        raise Int4ShapeError(f"scale/minimum must both be [n_groups, N], got {scale_shape}, {min_shape}")
    ng, n = scale_shape
    if tuple(packed_shape) != (ng * group_size // 2, n):
        raise Int4ShapeError(f"packed must be [n_groups*G/2, N] = {(ng * group_size // 2, n)}, "
                             f"got {tuple(packed_shape)}")
    if not 1 <= m <= MAX_M:
        raise Int4ShapeError(f"M={m} rows not supported by the Pallas kernel (1..{MAX_M})")
    if not (ng - 1) * group_size < k <= ng * group_size:
        raise Int4ShapeError(f"K={k} does not match n_groups={ng} x group_size={group_size}")
    if not (_is_pow2(block_n) and 16 <= block_n <= 1024):
        raise Int4ShapeError(f"block_n must be a power of 2 in [16, 1024], got {block_n}")
    if block_k % group_size or block_k <= 0:
        raise Int4ShapeError(f"block_k ({block_k}) must be a positive multiple of group_size ({group_size})")
    if split_k is not None and split_k < 1:
        raise Int4ShapeError(f"split_k must be >= 1, got {split_k}")


def _dot(a, b, *, trans_a=False, trans_b=False, precision=None):
    """f32-accumulating 2-D dot (what `pl.dot` did before its removal)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _int4_kernel(xlo_ref, xhi_ref, xs_ref, p_ref, s_ref, mn_ref, o_ref, *, m, mp, n, ng, half, block_n,
                 gpi, gps, cdt, magic, orient, n_ragged, split_out):
    j = pl.program_id(0)
    sk = pl.program_id(1)
    col0 = pl.multiple_of(j * block_n, block_n)
    cols = col0 + jnp.arange(block_n, dtype=jnp.int32)
    cmask = cols < n if n_ragged else None
    g_begin = sk * gps
    g_end = jnp.minimum(g_begin + gps, ng)
    f32 = jnp.float32

    def load_cols(ref, row):  # [block_n] f32
        if n_ragged:
            v = plgpu.load(ref.at[row, pl.ds(col0, block_n)], mask=cmask, other=0.0)
        else:
            v = ref[row, pl.ds(col0, block_n)]
        return v.astype(f32)

    def load_tile(g):  # [half, block_n] uint8
        rows = pl.ds(pl.multiple_of(g * half, half), half)
        if n_ragged:
            return plgpu.load(p_ref.at[rows, pl.ds(col0, block_n)], mask=cmask[None, :], other=0)
        return p_ref[rows, pl.ds(col0, block_n)]

    def unpack(p):
        if magic is not None:
            bits, _ = magic
            p16 = p.astype(jnp.uint16)
            lo = lax.bitcast_convert_type((p16 & 0xF) | bits, cdt)
            hi = lax.bitcast_convert_type((p16 >> 4) | bits, cdt)
        else:
            lo = (p & 0xF).astype(cdt)
            hi = (p >> 4).astype(cdt)
        return lo, hi

    prec = lax.Precision.HIGHEST if cdt == jnp.dtype(jnp.float32) else None

    def one_group(g, tile, acc):
        lo, hi = unpack(tile)
        s = load_cols(s_ref, g)
        mn = load_cols(mn_ref, g)
        if magic is not None:
            mn = mn - magic[1] * s
        xs = xs_ref[g, :]  # [mp] f32
        rows = pl.ds(pl.multiple_of(g * half, half), half)
        if orient == "xw":
            xl = xlo_ref[:, rows]  # [mp, half]
            xh = xhi_ref[:, rows]
            d = _dot(xl, lo, precision=prec) + _dot(xh, hi, precision=prec)  # [mp, bn]
            return acc + d * s[None, :] + xs[:, None] * mn[None, :]
        # "wx": acc^T [bn, mp] = lo^T . x_lo^T (weights as the M side of the dot)
        xl = xlo_ref[rows, :]  # [half, mp]
        xh = xhi_ref[rows, :]
        d = _dot(lo, xl, trans_a=True, precision=prec) + _dot(hi, xh, trans_a=True, precision=prec)
        return acc + d * s[:, None] + mn[:, None] * xs[None, :]

    def body_multi(i, acc):
        g0 = g_begin + i * gpi
        tiles = [load_tile(g0 + u) for u in range(gpi)]  # issue all loads first
        for u in range(gpi):
            acc = one_group(g0 + u, tiles[u], acc)
        return acc

    def body_one(g, acc):
        return one_group(g, load_tile(g), acc)

    acc_shape = (mp, block_n) if orient == "xw" else (block_n, mp)
    acc = jnp.zeros(acc_shape, f32)
    count = jnp.maximum(g_end - g_begin, 0)
    if gpi > 1:
        n_multi = count // gpi
        acc = lax.fori_loop(0, n_multi, body_multi, acc)
        acc = lax.fori_loop(g_begin + n_multi * gpi, g_end, body_one, acc)
    else:
        acc = lax.fori_loop(g_begin, g_end, body_one, acc)
    if orient != "xw":
        acc = acc.T
    rmask = (jnp.arange(mp, dtype=jnp.int32) < m)[:, None]
    mask = rmask if cmask is None else rmask & cmask[None, :]
    if split_out:
        plgpu.store(o_ref.at[sk, pl.ds(0, mp), pl.ds(col0, block_n)], acc.astype(o_ref.dtype), mask=mask)
    else:
        plgpu.store(o_ref.at[pl.ds(0, mp), pl.ds(col0, block_n)], acc.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "block_k", "num_warps", "num_stages",
                                             "split_k", "unpack", "orient", "interpret"))
def int4_matmul(x, packed, scale, minimum, *, group_size: int, block_n: int = 128, block_k: int | None = None,
                num_warps: int = 4, num_stages: int = 3, split_k: int | None = None, unpack: str = "auto",
                orient: str = "xw", interpret: bool = False):
    """Pallas INT4 matmul; same contract as `int4_matmul_reference` (returns x.dtype [M, N]).

    x [M, K] (M <= 64, K <= n_groups*G), packed uint8 [n_groups*G/2, N], scale/min f16 [n_groups, N].
    block_n: output columns per program (power of 2). block_k: K rows per loop step, a
    multiple of G (several group tiles loaded before use). split_k: programs along K
    (None: enough to fill ~2 programs per SM). unpack: "magic" (bit trick, 16-bit x),
    "cvt" (integer->float conversion), "auto" (magic for bf16/f16 x). orient: "xw" puts
    x on the M side of the dot, "wx" the weight tile (transposed dot).
    """
    block_k = group_size if block_k is None else block_k
    check_int4_matmul_args(x.shape, packed.shape, scale.shape, minimum.shape, group_size, block_n, block_k,
                           split_k)
    if orient not in ("xw", "wx"):
        raise Int4ShapeError(f"orient must be 'xw' or 'wx', got {orient!r}")
    m, k = x.shape
    ng, n = scale.shape
    half = group_size // 2
    kp = ng * group_size
    cdt = compute_dtype(x.dtype)
    if unpack == "auto":
        unpack = "magic" if cdt in _MAGIC else "cvt"
    if unpack == "magic" and cdt not in _MAGIC:
        raise Int4ShapeError("unpack='magic' needs bf16/f16 activations")
    if unpack not in ("magic", "cvt"):
        raise Int4ShapeError(f"unpack must be 'auto', 'magic' or 'cvt', got {unpack!r}")
    magic = _MAGIC[cdt] if unpack == "magic" else None
    mp = max(16, _next_pow2(m))
    gpi = block_k // group_size
    n_blocks = -(-n // block_n)
    splits = auto_split_k(ng, n_blocks, gpi) if split_k is None else min(split_k, ng)
    gps = -(-ng // splits)
    splits = -(-ng // gps)

    xp = jnp.pad(x, ((0, mp - m), (0, kp - k))).astype(cdt)
    xg = xp.reshape(mp, ng, 2, half)
    xlo = xg[:, :, 0, :].reshape(mp, ng * half)
    xhi = xg[:, :, 1, :].reshape(mp, ng * half)
    # x-sums of the values the dots see (after the cast to the compute dtype).
    xs = jnp.sum(xg.astype(jnp.float32), axis=(2, 3)).T  # [ng, mp]
    if orient == "wx":
        xlo, xhi = xlo.T, xhi.T

    split_out = splits > 1
    out_dtype = jnp.float32 if split_out else x.dtype
    out_shape = (splits, m, n) if split_out else (m, n)
    kernel = functools.partial(
        _int4_kernel, m=m, mp=mp, n=n, ng=ng, half=half, block_n=block_n, gpi=gpi, gps=gps, cdt=cdt,
        magic=magic, orient=orient, n_ragged=(n % block_n != 0), split_out=split_out)
    params = None
    if not interpret:
        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(n_blocks, splits),
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        compiler_params=params,
        interpret=interpret,
        name="int4_matmul",
    )(xlo, xhi, xs, packed, scale, minimum)
    if split_out:
        out = jnp.sum(out, axis=0).astype(x.dtype)
    return out


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------

_WARNED: set = set()


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover
        return False


def pallas_unsupported_reason(m: int, qw, dtype=None) -> str | None:
    """Why the Pallas kernel cannot take [m, K] @ qw (None if it can)."""
    g = qw.group_size
    if g not in SUPPORTED_GROUP_SIZES:
        return f"group_size {g} not in {SUPPORTED_GROUP_SIZES}"
    if not 1 <= m <= MAX_M:
        return f"M={m} rows outside 1..{MAX_M}"
    if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                                       jnp.dtype(jnp.float32)):
        return f"activation dtype {jnp.dtype(dtype)} not supported"
    return None


def int4_linear(x, qw, *, backend: str = "auto", interpret: bool = False, **kernel_kwargs):
    """y[..., N] = x[..., K] @ W for a `QuantizedWeight` qw.

    backend: "pallas" (raise ValueError if the kernel cannot take the shapes),
    "reference" (`int4_matmul_reference`), "dequant" (dequantize to x.dtype, then an XLA
    dot: what prefill wants), "auto" (pallas on GPU when supported, else dequant for
    more than MAX_M rows, else the reference; a fallback on GPU warns once with the
    reason). interpret=True runs the Pallas kernel in interpret mode (any backend).
    """
    *lead, k = x.shape
    if k != qw.in_features:
        raise ValueError(f"x has {k} features, the weight expects {qw.in_features}")
    m = math.prod(lead) if lead else 1
    x2 = x.reshape(m, k)
    if backend == "auto":
        reason = pallas_unsupported_reason(m, qw, x.dtype)
        if reason is None and (_on_gpu() or interpret):
            backend = "pallas"
        else:
            if reason is not None and _on_gpu() and reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(f"int4_linear: Pallas kernel not used ({reason}); falling back to XLA")
            backend = "dequant" if m > MAX_M else "reference"
    if backend == "pallas":
        reason = pallas_unsupported_reason(m, qw, x.dtype)
        if reason is not None:
            raise Int4ShapeError(f"int4_linear(backend='pallas'): {reason}")
        y = int4_matmul(x2, qw.packed, qw.scale, qw.minimum, group_size=qw.group_size, interpret=interpret,
                        **kernel_kwargs)
    elif backend == "reference":
        y = int4_matmul_reference(x2, qw.packed, qw.scale, qw.minimum, group_size=qw.group_size)
    elif backend == "dequant":
        from qspec_jax.quant_weights import dequantize_weight
        w = dequantize_weight(qw, x.dtype)
        y = jnp.dot(x2, w, preferred_element_type=jnp.float32).astype(x.dtype)
    else:
        raise ValueError(f"unknown backend {backend!r} (auto, pallas, reference, dequant)")
    return y.reshape(*lead, y.shape[-1])
