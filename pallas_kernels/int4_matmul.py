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
Split-K partials `[splits, M, N]` (f32) are summed by XLA. `prefetch` (default) loads
step i+1 (tile, stats, x) before computing step i: Triton's pipeliner does not take
loads that reach the dot through bit operations, and without it each program waits a
full memory latency per group.

Status (H100 80GB HBM3, jax 0.11.2, 2026-11-25; scripts/bench_kernels.py): correct on
the GPU (bf16/f16/f32, ragged K and N, G = 32..256, M = 1..8); speed measured only
before `prefetch` existed: M=1, K=4096, N=14336: 35 us (0.88 TB/s of INT4 bytes) vs
bf16 x @ W 55 us (1.56x); K=14336, N=4096: 37 us vs 48 us. The 2.2 TB/s goal is not
reached; `scripts/bench_kernels.py --sweep` has the block-size sweep still to run.

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


def _column_block(p_ref, *, n, ng, g, block_n, gps, n_ragged):
    """What both kernels' programs share: program (j, sk) owns output columns
    [j*block_n, +block_n) (masked past N when ragged) and K groups [sk*gps, g_end).

    Returns (col0, cmask, g_begin, g_end, load_cols, load_tile): load_cols(ref, row) reads
    row `row` of a [n_groups, N] stats array as f32 [block_n]; load_tile(gi) reads group gi's
    packed tile, uint8 [G/2, block_n] (zeros past N)."""
    half = g // 2
    col0 = pl.multiple_of(pl.program_id(0) * block_n, block_n)
    cmask = (col0 + jnp.arange(block_n, dtype=jnp.int32)) < n if n_ragged else None
    g_begin = pl.program_id(1) * gps
    g_end = jnp.minimum(g_begin + gps, ng)

    def load_cols(ref, row):
        if n_ragged:
            return plgpu.load(ref.at[row, pl.ds(col0, block_n)], mask=cmask, other=0.0).astype(jnp.float32)
        return ref[row, pl.ds(col0, block_n)].astype(jnp.float32)

    def load_tile(gi):
        rows = pl.ds(pl.multiple_of(gi * half, half), half)
        if n_ragged:
            return plgpu.load(p_ref.at[rows, pl.ds(col0, block_n)], mask=cmask[None, :], other=0)
        return p_ref[rows, pl.ds(col0, block_n)]

    return col0, cmask, g_begin, g_end, load_cols, load_tile


def _int4_kernel(x_ref, p_ref, s_ref, mn_ref, o_ref, *, m, mp, k, n, ng, g, block_n, gpi, gps, cdt, magic,
                 orient, n_ragged, split_out, prefetch):
    half = g // 2
    sk = pl.program_id(1)
    col0, cmask, g_begin, g_end, load_cols, load_tile = _column_block(
        p_ref, n=n, ng=ng, g=g, block_n=block_n, gps=gps, n_ragged=n_ragged)
    f32 = jnp.float32
    xrow_mask = (jnp.arange(mp, dtype=jnp.int32) < m)[:, None]
    k_ragged = k != ng * g
    prec = lax.Precision.HIGHEST if cdt == jnp.dtype(jnp.float32) else None

    def load_x(c0):  # x[:, c0:c0+half] as [mp, half] in cdt, zero outside [m, k]
        mask = xrow_mask
        if k_ragged:
            mask = mask & ((c0 + jnp.arange(half, dtype=jnp.int32)) < k)[None, :]
        return plgpu.load(x_ref.at[pl.ds(0, mp), pl.ds(c0, half)], mask=mask, other=0).astype(cdt)

    def unpack(p):
        if magic is not None:
            p16 = p.astype(jnp.uint16)
            lo = lax.bitcast_convert_type((p16 & 0xF) | magic[0], cdt)
            hi = lax.bitcast_convert_type((p16 >> 4) | magic[0], cdt)
        else:
            lo = (p & 0xF).astype(cdt)
            hi = (p >> 4).astype(cdt)
        return lo, hi

    def load_group(gi):  # everything one group needs from memory
        c0 = gi * g
        return (load_tile(gi), load_cols(s_ref, gi), load_cols(mn_ref, gi), load_x(c0), load_x(c0 + half))

    def one_group(data, acc, valid=None):
        tile, s, mn, xl, xh = data
        lo, hi = unpack(tile)
        if valid is not None:  # a prefetched group past the program's range contributes 0
            s = jnp.where(valid, s, 0.0)
            mn = jnp.where(valid, mn, 0.0)
        if magic is not None:
            mn = mn - magic[1] * s
        xs = jnp.sum(xl.astype(f32), axis=1) + jnp.sum(xh.astype(f32), axis=1)  # [mp]
        if orient == "xw":
            d = _dot(xl, lo, precision=prec) + _dot(xh, hi, precision=prec)  # [mp, bn]
            return acc + d * s[None, :] + xs[:, None] * mn[None, :]
        # "wx": acc^T [bn, mp] = lo^T . xl^T (the weight tile is the M side of the dot)
        d = (_dot(lo, xl, trans_a=True, trans_b=True, precision=prec)
             + _dot(hi, xh, trans_a=True, trans_b=True, precision=prec))
        return acc + d * s[:, None] + mn[:, None] * xs[None, :]

    acc_shape = (mp, block_n) if orient == "xw" else (block_n, mp)
    acc = jnp.zeros(acc_shape, f32)
    count = jnp.maximum(g_end - g_begin, 0)
    last = jnp.maximum(g_end - 1, 0)
    if prefetch:
        # Software pipelining by hand: step i computes groups loaded during step i-1.
        n_steps = -(-count // gpi) if gpi > 1 else count

        def load_step(g0):
            return [load_group(jnp.minimum(g0 + u, last)) for u in range(gpi)]

        def body_pf(i, carry):
            acc, cur = carry
            g0 = g_begin + i * gpi
            nxt = load_step(g0 + gpi)
            for u in range(gpi):
                acc = one_group(cur[u], acc, valid=(g0 + u < g_end) if gpi > 1 else None)
            return acc, nxt

        acc, _ = lax.fori_loop(0, n_steps, body_pf, (acc, load_step(g_begin)))
    else:
        def body_multi(i, acc):
            g0 = g_begin + i * gpi
            data = [load_group(g0 + u) for u in range(gpi)]  # issue all loads first
            for u in range(gpi):
                acc = one_group(data[u], acc)
            return acc

        def body_one(gi, acc):
            return one_group(load_group(gi), acc)

        if gpi > 1:
            n_multi = count // gpi
            acc = lax.fori_loop(0, n_multi, body_multi, acc)
            acc = lax.fori_loop(g_begin + n_multi * gpi, g_end, body_one, acc)
        else:
            acc = lax.fori_loop(g_begin, g_end, body_one, acc)
    if orient != "xw":
        acc = acc.T
    mask = xrow_mask if cmask is None else xrow_mask & cmask[None, :]
    if split_out:
        plgpu.store(o_ref.at[sk, pl.ds(0, mp), pl.ds(col0, block_n)], acc.astype(o_ref.dtype), mask=mask)
    else:
        plgpu.store(o_ref.at[pl.ds(0, mp), pl.ds(col0, block_n)], acc.astype(o_ref.dtype), mask=mask)


_F32_MAGIC = (0x4B000000, 8388608.0)  # f32 bits 0x4B000000|c == 2**23 + c
MAX_SIMT_M = 8


def _int4_simt_kernel(x_ref, p_ref, s_ref, mn_ref, o_ref, *, m, k, n, ng, g, block_n, gpi, gps, magic,
                      n_ragged, split_out, acc2d):
    """CUDA-core GEMV: no tensor-core dot, so the unpacked tile never changes layout.

    A tensor-core dot needs its operands in the MMA register layout; Triton moves the
    unpacked 16-bit tile there through shared memory, 4 bytes of traffic per packed byte,
    which caps the dot version near 1 TB/s. Here every thread multiplies the bytes it
    loaded by the x values of their rows and keeps partial sums in place:
      acc2d=True   acc[half, bn] += (lo * x_lo + hi * x_hi) * s_g   (one reduction at the end)
      acc2d=False  y[bn] += sum_rows(lo * x_lo + hi * x_hi) * s_g   (a reduction per group)
    and y += (sum x_g) * mn_g. f32 arithmetic; nibbles become f32 by the 2**23 bit trick
    (one OR and one exact subtraction instead of an int->float conversion) when magic.
    """
    half = g // 2
    sk = pl.program_id(1)
    col0, cmask, g_begin, g_end, load_cols, load_tile = _column_block(
        p_ref, n=n, ng=ng, g=g, block_n=block_n, gps=gps, n_ragged=n_ragged)
    f32 = jnp.float32
    k_ragged = k != ng * g

    def load_x(r, c0):  # [half] f32, zero past K
        if k_ragged:
            mask = (c0 + jnp.arange(half, dtype=jnp.int32)) < k
            return plgpu.load(x_ref.at[pl.ds(r, 1), pl.ds(c0, half)], mask=mask[None, :], other=0)[0].astype(f32)
        return x_ref[pl.ds(r, 1), pl.ds(c0, half)][0].astype(f32)

    def unpack(t):
        if magic:
            t32 = t.astype(jnp.uint32)
            lo = lax.bitcast_convert_type((t32 & 0xF) | _F32_MAGIC[0], f32) - _F32_MAGIC[1]
            hi = lax.bitcast_convert_type((t32 >> 4) | _F32_MAGIC[0], f32) - _F32_MAGIC[1]
            return lo, hi
        return (t & 0xF).astype(f32), (t >> 4).astype(f32)

    def step(gi, carry):
        lo, hi = unpack(load_tile(gi))
        s = load_cols(s_ref, gi)
        mn = load_cols(mn_ref, gi)
        c0 = gi * g
        out = []
        for r in range(m):
            acc_r, y_r = carry[r]
            xl, xh = load_x(r, c0), load_x(r, c0 + half)
            t = lo * xl[:, None] + hi * xh[:, None]
            y_r = y_r + (jnp.sum(xl) + jnp.sum(xh)) * mn
            if acc2d:
                acc_r = acc_r + t * s[None, :]
            else:
                y_r = y_r + jnp.sum(t, axis=0) * s
            out.append((acc_r, y_r))
        return tuple(out)

    acc0 = jnp.zeros((half, block_n) if acc2d else (1, block_n), f32)
    init = tuple((acc0, jnp.zeros((block_n,), f32)) for _ in range(m))
    res = lax.fori_loop(g_begin, g_end, step, init)
    for r in range(m):
        acc_r, y_r = res[r]
        if acc2d:
            y_r = y_r + jnp.sum(acc_r, axis=0)
        idx = (pl.ds(r, 1), pl.ds(col0, block_n))
        lead = (1, 1)
        if split_out:
            idx, lead = (pl.ds(sk, 1),) + idx, (1, 1, 1)
        y_r = y_r.astype(o_ref.dtype).reshape(lead[:-1] + (block_n,))
        if n_ragged:
            plgpu.store(o_ref.at[idx], y_r, mask=cmask.reshape(lead[:-1] + (block_n,)))
        else:
            o_ref[idx] = y_r


def resolve_defaults(m: int, n: int, orient: str, block_n, split_k):
    """orient / block_n / split_k where the caller left them "auto" / None (see int4_matmul)."""
    if orient == "auto":
        orient = "simt" if m == 1 else "xw"
    if block_n is None:
        block_n = 256 if (orient == "simt" and n >= 4096) else 128
    if split_k is None and orient == "simt" and n >= 4096:
        split_k = 16
    return orient, block_n, split_k


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "block_k", "num_warps", "num_stages",
                                             "split_k", "unpack", "orient", "prefetch", "simt_acc",
                                             "interpret"))
def int4_matmul(x, packed, scale, minimum, *, group_size: int, block_n: int | None = None,
                block_k: int | None = None, num_warps: int = 4, num_stages: int = 3, split_k: int | None = None,
                unpack: str = "auto", orient: str = "auto", prefetch: bool = True, simt_acc: str = "auto",
                interpret: bool = False):
    """Pallas INT4 matmul; same contract as `int4_matmul_reference` (returns x.dtype [M, N]).

    x [M, K] (M <= 64, K <= n_groups*G), packed uint8 [n_groups*G/2, N], scale/min f16 [n_groups, N].
    block_n: output columns per program (power of 2). block_k: K rows per loop step, a
    multiple of G (several group tiles loaded before use). split_k: programs along K
    (None: enough to fill ~2 programs per SM); partials are summed by XLA. unpack:
    "magic" (bit trick, 16-bit x), "cvt" (integer->float conversion), "auto" (magic for
    bf16/f16 x). orient: "xw" puts x on the M side of the dot, "wx" the weight tile.
    prefetch: load step i+1 (tiles, stats, x) before computing step i (by hand, since
    Triton's pipeliner does not take loads that reach the dot through bit operations).
    f32 x is computed in f32 (exact dots); bf16/f16 x as is.
    Defaults (None / "auto") are the H100 sweep's best (docs/benchmarks.md): M = 1 takes
    "simt" with block_n 256 and split_k 16 where N >= 4096, block_n 128 below; M > 1 the
    "xw" dot with block_n 128.
    """
    orient, block_n, split_k = resolve_defaults(x.shape[0] if x.ndim == 2 else 1, scale.shape[-1], orient,
                                                block_n, split_k)
    block_k = group_size if block_k is None else block_k
    check_int4_matmul_args(x.shape, packed.shape, scale.shape, minimum.shape, group_size, block_n, block_k,
                           split_k)
    if orient not in ("xw", "wx", "simt"):
        raise Int4ShapeError(f"orient must be 'auto', 'xw', 'wx' or 'simt', got {orient!r}")
    if orient == "simt" and x.shape[0] > MAX_SIMT_M:
        raise Int4ShapeError(f"orient='simt' takes M <= {MAX_SIMT_M} rows, got {x.shape[0]}")
    if simt_acc not in ("auto", "2d", "reduce"):
        raise Int4ShapeError(f"simt_acc must be 'auto', '2d' or 'reduce', got {simt_acc!r}")
    m, k = x.shape
    ng, n = scale.shape
    cdt = compute_dtype(x.dtype)
    if unpack == "auto":
        unpack = "magic" if (cdt in _MAGIC or orient == "simt") else "cvt"
    if unpack == "magic" and cdt not in _MAGIC and orient != "simt":
        raise Int4ShapeError("unpack='magic' needs bf16/f16 activations")
    if unpack not in ("magic", "cvt"):
        raise Int4ShapeError(f"unpack must be 'auto', 'magic' or 'cvt', got {unpack!r}")
    magic = _MAGIC[cdt] if (unpack == "magic" and orient != "simt") else None
    mp = max(16, _next_pow2(m))
    gpi = block_k // group_size
    n_blocks = -(-n // block_n)
    splits = auto_split_k(ng, n_blocks, gpi) if split_k is None else min(split_k, ng)
    gps = -(-ng // splits)
    splits = -(-ng // gps)

    split_out = splits > 1
    out_dtype = jnp.float32 if split_out else x.dtype
    out_shape = (splits, m, n) if split_out else (m, n)
    if orient == "simt":
        acc2d = (m == 1) if simt_acc == "auto" else simt_acc == "2d"
        kernel = functools.partial(
            _int4_simt_kernel, m=m, k=k, n=n, ng=ng, g=group_size, block_n=block_n, gpi=gpi, gps=gps,
            magic=(unpack == "magic"), n_ragged=(n % block_n != 0), split_out=split_out, acc2d=acc2d)
    else:
        kernel = functools.partial(
            _int4_kernel, m=m, mp=mp, k=k, n=n, ng=ng, g=group_size, block_n=block_n, gpi=gpi, gps=gps,
            cdt=cdt, magic=magic, orient=orient, n_ragged=(n % block_n != 0), split_out=split_out,
            prefetch=prefetch)
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
    )(x, packed, scale, minimum)
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
