"""INT4 group-wise weight matmul: y[M, N] = x[M, K] @ W, W in the QuantizedWeight layout.

Layout (`qspec_jax.quant_weights`), K-major: packed uint8 [N, n_groups, G/2] (byte j of
group g of column n: row g*G + j in the low nibble, row g*G + G/2 + j in the high one),
scale / minimum float16 [N, n_groups]. `int4_matmul_reference` is plain `jnp` and runs
anywhere; it is what the kernel is tested against.

`int4_matmul` is a Pallas GPU kernel (Pallas-Triton lowering) for decode GEMVs, M = 1..8
rows (more rows are prefill: `int4_linear` dequantizes and lets XLA do the matmul).
Program (j, s) owns `block_n` output columns and a range of K groups (split-K); it loops
over steps of S = `groups_per_step` groups, loading per step a tile uint8 [block_n, S, G/2]
(each column's bytes contiguous), the stats [block_n, S] and x [S, G/2] twice per row
(low and high halves of each group). Per row r, all in f32:
  lo = byte & 0xF, hi = byte >> 4        (nibble -> f32 by the 2**23 bit trick: one OR and
                                          one exact subtraction, no int->float conversion)
  d  = sum_j lo * x_lo + hi * x_hi        [block_n, S]   (reduction along the contiguous axis)
  acc_r += d * scale + (sum x_g) * min    [block_n, S]
and y_r = sum(acc_r, axis=1) at the end. Split-K partials [splits, M, N] (f32) are summed
by XLA.

Why K-major: the previous layout ([n_groups*G/2, N], N contiguous) put the reduction axis
across threads, so a GEMV either went through tensor-core dots (the unpacked tile
converted to the MMA layout through shared memory) or kept a [G/2, block_n] accumulator
per row. With K contiguous the reduction over a group's bytes stays inside a thread and
a warp's shuffles, the loads are wide and coalesced along K, and the accumulator is just
[block_n, groups_per_step] per row. No dot, so bf16/f16/f32 activations take one code
path (f32 arithmetic inside, output in x.dtype).

For M > 2 the "dot" path (`_int4_dot_kernel`) takes over: per group, tensor-core dots of
the K-major tile [block_n, G/2] (already the row-major A operand) with x's halves; the
reduce kernel's work grows with M, a dot's does not. `resolve_path` picks per M.

`prefetch=True` ("reduce") pipelines by hand: step i+1's tile, stats and x are loaded
before step i is computed. It lost in the H100 sweep (docs/results/kernels_sweep4_kmajor_h100.json)
for short K; since the packed fmas it wins on the long-K down projection (7 steps per program), so
the default takes it there (`PREFETCH_MIN_STEPS`).

Unpacking (`asm=None`, the default: on wherever the device takes PTX): four packed bytes
at a time through inline PTX (`pallas_kernels.nibbles`): each code becomes 128 + code in
f32 by one shift and one LOP3, the offset leaves through sum(x). Nsight Compute had this kernel issue-bound (issue slots
67-69% busy, top stall "not selected"): the PTX cut its instructions by 28%.

Status (NVIDIA H200, jax 0.11.2, 2026-11-26, session 5; docs/benchmarks.md, device time per
call, bf16, G=128), M = 1: 4096x28672 27.9 us (2.23 TB/s of INT4 bytes), 4096x128256 109.7
us (2.54 TB/s), 14336x4096 17.6 us (1.77 TB/s), 4096x6144 8.3 us (1.60 TB/s); the same
kernel with the jnp bit tricks ran 36.5 / 145.5 / 22.9 / 10.2 us, as on the H100 in session
3 (the kernel is not memory bound, so the two cards time it alike). M = 4 ("dot"): 0.87-1.05
TB/s, about the bf16 dot. The 2.2 TB/s target is met on the wide shapes only; the narrow ones
lack programs (split-K adds a partial-sum kernel).

Packed 16-bit inner product (session 9, `fma16`, the default for bf16 / f16 activations on the
"reduce" path): the tile is read as uint32 words of four packed bytes, x as words of two 16-bit
activations, and `nibbles.word_dot16` does per word: codes by PRMT + LOP3, centered (c - 8) by a
packed fma, then four packed fmas (bf16x2 / f16x2) that multiply and accumulate two lanes of four
products each, added in f32. About half the instructions per code of the f32 path (Nsight had
that path issue-bound and Triton never contracts its FMUL + FADD). H100, one run
(docs/results/int4_fma16_ab_session9_h100_2026-11-26.txt): gate/up 29.9 -> 25.3 us (2.47 TB/s),
lm_head 116.2 -> 99.0 us (2.82 TB/s), down 16.8 -> 15.8, qkv 8.8 -> 8.2, o 6.3 -> 6.0; M = 2
17.4 -> 10.1 us (qkv). The products' partial sums round to 16 bits (relative ~2**-9 in bf16, far
under the INT4 weights' own error; GPU checks 3.2e-3 worst).

Fused forms (session 7): `norm_weight` (RMSNorm of x first: x * g as it is loaded, the sum of
squares in the same loop, rsqrt on the output), `act="silu_mul"` (a program owns a gate and the
matching up column block) and `residual` (added before the store): a draft step's decoder
layer went from 17 to 11 kernels (H100: draft step -6% at 32K). `int4_fused_reference` is
their jnp reference.

`int4_qkv_to_cache` (session 16): the draft's q | k | v projection with `qkv_to_cache` in its
epilogue. A program owns one head's rotary pairs (channels c.. and c + D/2..), so it ropes them,
writes k / v into the buffer and the queries in the attention's layout itself: one kernel per
layer instead of two. H100 (docs/benchmarks.md, session 16): 9.0 us in the decode step, as the plain
projection took (the two kernels: 9.1 + 1.4 us); the draft step -0.9% at 32K in two in-process A/Bs,
-0.7% and 0.0% at 128K.

`int4_linear` is the dispatcher a model calls with a `QuantizedWeight`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Pallas-Triton is deprecated in jax 0.11 but present; only needed on GPU.
    from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover
    plgpu = None

from pallas_kernels.nibbles import (CENTER, MAGIC16, MAGIC_F32, mul16_words, nibbles16, nibbles_f32, ptx_available,
                                    word_dot16)


def int4_matmul_reference(x, packed, scale, minimum, *, group_size: int):
    """x [M, K] (K <= n_groups*G), packed uint8 [N, n_groups, G/2], scale/min f16 [N, n_groups].

    Per-group dots, then scale: y = sum_g (x_g . c_g) * s_g + (sum x_g) * mn_g.
    Accumulates in float32, returns x.dtype.
    """
    m, k = x.shape
    n, ng = scale.shape
    codes = jnp.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(jnp.float32)  # [N, ng, G]
    xg = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, ng * group_size - k))).reshape(m, ng, group_size)
    dots = jnp.einsum("mgk,ngk->mng", xg, codes)
    y = dots * scale.astype(jnp.float32) + jnp.sum(xg, axis=-1)[:, None, :] * minimum.astype(jnp.float32)
    return jnp.sum(y, axis=-1).astype(x.dtype)


ACTIVATIONS = (None, "silu_mul")


def fused_prologue_scale(x, norm_weight, eps):
    """RMSNorm folded into a matmul: rms_norm(x) * g @ W = rsqrt(mean(x**2) + eps) * ((x * g) @ W).
    -> (x * g in float32, the per-row factor float32 [M, 1])."""
    xf = x.astype(jnp.float32)
    inv = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return xf * norm_weight.astype(jnp.float32), inv


def normed_input(x, norm_weight, eps):
    """x in x.dtype for the paths that apply the norm before a plain matmul (the tensor-core
    kernel, dequantize + XLA dot); x itself when norm_weight is None."""
    if norm_weight is None:
        return x
    xg, inv = fused_prologue_scale(x, norm_weight, eps)
    return (xg * inv).astype(x.dtype)


def fused_epilogue(y, *, act=None, residual=None):
    """y float32 [M, N or 2N] -> float32 [M, N]: silu(gate) * up for act="silu_mul" (columns
    gate | up), then + residual."""
    if act == "silu_mul":
        gate, up = jnp.split(y, 2, axis=-1)
        y = gate * lax.logistic(gate) * up
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y


def int4_fused_reference(x, packed, scale, minimum, *, group_size: int, norm_weight=None, norm_eps: float = 1e-6,
                         residual=None, act=None, rms_only: bool = False):
    """The fused forms of `int4_matmul` in plain jnp, float32 inside, x.dtype out:
      norm_weight: the input is rms_norm(x) * norm_weight (eps norm_eps) instead of x;
      rms_only (norm_weight None): the input is rms_norm(x) without a weight (a weight folded into W);
      act="silu_mul": W's columns are gate | up, the output silu(gate) * up (N/2 columns);
      residual [M, N_out]: added to the output.
    """
    if norm_weight is None and rms_only:
        norm_weight = jnp.ones((x.shape[-1],), jnp.float32)
    xin, inv = (x.astype(jnp.float32), None) if norm_weight is None else fused_prologue_scale(x, norm_weight, norm_eps)
    y = int4_matmul_reference(xin, packed, scale, minimum, group_size=group_size)
    if inv is not None:
        y = y * inv
    return fused_epilogue(y, act=act, residual=residual).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
MAX_M = 8  # rows the kernel takes (decode / verify, unrolled); more rows are prefill, use XLA
PREFETCH_MIN_STEPS = 6  # M = 1 prefetches when a program makes this many loop steps (down: 7)
TARGET_PROGRAMS = 264  # split-K aims at ~2 programs per SM (132 SMs on H100 / H200)
MAX_TILE_BYTES = 1 << 16  # block_n * groups_per_step * G/2: bigger tiles only spill registers
DEFAULT_BLOCK_N = 16
DEFAULT_GROUPS_PER_STEP = 8
M1_GROUPS_PER_STEP = 16  # M = 1 with the inline-PTX unpack (H200 sweep, session 5: 27.9 vs 28.7 us on gate/up)
M1_NARROW_N = 4096  # M = 1 and N <= this: block_n 8, so the narrow projections (o, down) get
M1_NARROW_BLOCK_N = 8  # enough programs without split-K (H100 sweep, session 6: 8.2 -> 6.2 / 18.7 -> 16.6 us)
DOT_BLOCK_N = 64  # the M > 2 tensor-core path ("dot")
DOT_GROUPS_PER_STEP = 1
_F32_MAGIC = (0x4B000000, 8388608.0)  # f32 bits 0x4B000000 | c == 2**23 + c (c < 2**23)


class Int4ShapeError(ValueError):
    """Inputs the Pallas INT4 matmul does not take (raised before any launch)."""


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and (v & (v - 1)) == 0


def check_int4_matmul_args(x_shape, packed_shape, scale_shape, min_shape, group_size, block_n=DEFAULT_BLOCK_N,
                           groups_per_step=DEFAULT_GROUPS_PER_STEP, split_k=None, num_warps=4, *, x_dtype=None,
                           packed_dtype=None):
    """Raise Int4ShapeError if the kernel cannot take these shapes / dtypes / block sizes."""
    if len(x_shape) != 2:
        raise Int4ShapeError(f"x must be [M, K], got shape {tuple(x_shape)}")
    m, k = x_shape
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise Int4ShapeError(f"group_size {group_size} not supported by the Pallas kernel "
                             f"(supported: {SUPPORTED_GROUP_SIZES})")
    half = group_size // 2
    if len(packed_shape) != 3 or packed_shape[2] != half:
        raise Int4ShapeError(f"packed must be uint8 [N, n_groups, G/2] = [N, n_groups, {half}] (the K-major "
                             f"layout), got shape {tuple(packed_shape)}")
    n, ng = packed_shape[:2]
    if tuple(scale_shape) != (n, ng) or tuple(min_shape) != (n, ng):
        raise Int4ShapeError(f"scale/minimum must both be [N, n_groups] = {(n, ng)} (from packed "
                             f"{tuple(packed_shape)}), got {tuple(scale_shape)}, {tuple(min_shape)}")
    if packed_dtype is not None and jnp.dtype(packed_dtype) != jnp.dtype(jnp.uint8):
        raise Int4ShapeError(f"packed must be uint8, got {jnp.dtype(packed_dtype)}")
    if x_dtype is not None and jnp.dtype(x_dtype) not in SUPPORTED_DTYPES:
        raise Int4ShapeError(f"x dtype {jnp.dtype(x_dtype)} not supported (bfloat16, float16, float32)")
    if not 1 <= m <= MAX_M:
        raise Int4ShapeError(f"M={m} rows not supported by the Pallas kernel (1..{MAX_M}; more rows: "
                             f"int4_linear's 'dequant' backend)")
    if not (ng - 1) * group_size < k <= ng * group_size:
        raise Int4ShapeError(f"K={k} does not match n_groups={ng} x group_size={group_size} "
                             f"(need {(ng - 1) * group_size} < K <= {ng * group_size})")
    if not (_is_pow2(block_n) and 4 <= block_n <= 256):
        raise Int4ShapeError(f"block_n must be a power of 2 in [4, 256], got {block_n}")
    if not (_is_pow2(groups_per_step) and groups_per_step <= 64):
        raise Int4ShapeError(f"groups_per_step must be a power of 2 in [1, 64], got {groups_per_step}")
    if block_n * groups_per_step * half > MAX_TILE_BYTES:
        raise Int4ShapeError(f"tile block_n * groups_per_step * G/2 = {block_n}*{groups_per_step}*{half} bytes "
                             f"exceeds {MAX_TILE_BYTES}: lower block_n or groups_per_step")
    if split_k is not None and not (isinstance(split_k, int) and split_k >= 1):
        raise Int4ShapeError(f"split_k must be an integer >= 1 (or None: auto), got {split_k!r}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise Int4ShapeError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps!r}")


def split_plan(n_groups: int, n_blocks: int, groups_per_step: int, split_k: int | None = None):
    """(splits, groups per split). split_k None: max(1, min(n_groups // groups_per_step,
    ceil(TARGET_PROGRAMS / n_blocks))); an explicit split_k is capped at n_groups. With
    more than one split, the groups per split are rounded up to a multiple of
    groups_per_step (only the last split is ragged), and the number of splits follows from
    that (every split has at least one group)."""
    gpb = groups_per_step
    if split_k is None:
        split_k = max(1, min(n_groups // gpb, -(-TARGET_PROGRAMS // n_blocks)))
    split_k = max(1, min(split_k, n_groups))
    gps = -(-n_groups // split_k)
    if split_k > 1:
        gps = -(-gps // gpb) * gpb
    splits = -(-n_groups // gps)
    return splits, (gps if splits > 1 else n_groups)


def _program_block(*, n, ng, block_n, gps, n_ragged):
    """What both kernels' programs share: program (j, sk) owns output columns cols =
    [j*block_n, +block_n) (cmask: those < N, when N is ragged) and K groups [g_begin, g_end)."""
    n0 = pl.multiple_of(pl.program_id(0) * block_n, block_n)
    sk = pl.program_id(1)
    g_begin = sk * gps
    g_end = jnp.minimum(g_begin + gps, ng)
    cmask = (n0 + jnp.arange(block_n, dtype=jnp.int32)) < n if n_ragged else None
    return sk, g_begin, g_end, cmask, n0


def _int4_kernel(*refs, m, n, ng, half, block_n, gpb, gps, steps, n_ragged, g_ragged, split_out, prefetch, asm,
                 norm, paired, residual, fma16=None, weighted=True, rope=None):
    """One program: columns [j*block_n, +block_n) (masked past N), groups [s*gps, g_end).

    Fused forms (refs after x, packed, scale, min: the norm weight, then the residual):
    norm = (K, eps): x is multiplied by the norm weight as it is loaded, and the output by
    rsqrt(sum(x**2) / K + eps). Without split-K the program's loop sees all of x, so the sum
    of squares rides along in the loop; a split program makes one extra pass over x (its
    latency exposed: on the H100 that pass cost gate/up ~3 us). paired: the program also
    owns columns [N + j*block_n, +block_n) (W = gate | up) and stores silu(gate) * up.
    residual: [M, N], loaded before the loop, added before the store. With split-K the
    partials (normalized, not paired or added) go out and XLA finishes.

    rope (a `_RopeCache`, `int4_qkv_to_cache`): W is a layer's q | k | v projection and the program
    owns channels [c, c + block_n) and [c + D/2, +block_n) of one head, the rotary pairs; its
    epilogue does `qkv_to_cache`'s work for them (rope, the query rows, the buffer writes).

    fma16 (bf16 / f16, the activations' dtype): the packed-16-bit inner product
    (`nibbles.word_dot16`). p_ref is then the packed codes viewed as uint32 words [N, ng, G/8],
    and two more refs follow: x (and the norm weight, with norm) as uint32 words of 16-bit
    pairs [M, ng, 2, G/8, 2] (half of the group, word of four codes, pair 01 / 23). x_ref still
    feeds the sums (sum(x) for the offsets, sum(x**2) for the norm) in float32."""
    f32 = jnp.float32
    if rope is None:
        x_ref, p_ref, s_ref, mn_ref, *rest, o_ref = refs
    else:
        x_ref, p_ref, s_ref, mn_ref, *rest, q_out, bk_out, bv_out = refs
    g_ref = rest.pop(0) if norm is not None and weighted else None
    r_ref = rest.pop(0) if residual else None
    xw_ref = rest.pop(0) if fma16 is not None else None
    gw_ref = rest.pop(0) if fma16 is not None and norm is not None and weighted else None
    sk, g_begin, g_end, cmask, n0 = _program_block(n=n, ng=ng, block_n=block_n, gps=gps, n_ragged=n_ragged)
    col_sets = [pl.ds(n0, block_n)] + ([pl.ds(n0 + n, block_n)] if paired else [])
    if rope is not None:  # one head's channel pairs (c, c + D/2): head j // P, channels (j % P) * block_n
        per_head = rope.head_dim // 2 // block_n
        head, c_in = pl.program_id(0) // per_head, (pl.program_id(0) % per_head) * block_n
        n0 = head * rope.head_dim + c_in
        col_sets = [pl.ds(n0, block_n), pl.ds(n0 + rope.head_dim // 2, block_n)]

    def load_step(i):
        """Everything step i reads: per column set a tile uint8 [bn, gpb, G/2] and scale / min
        f32 [bn, gpb], and per row x_lo, x_hi f32 [gpb, G/2] (times the norm weight). Groups
        past g_end (ragged) and columns past N read as zeros."""
        g0 = g_begin + i * gpb
        grp = pl.ds(g0, gpb)
        gmask = (g0 + jnp.arange(gpb, dtype=jnp.int32)) < g_end
        tiles = []
        for cols in col_sets:
            if g_ragged or n_ragged:
                m2 = gmask[None, :] if cmask is None else (gmask[None, :] & cmask[:, None])
                tile = plgpu.load(p_ref.at[cols, grp, :], mask=m2[:, :, None], other=0)
                s = plgpu.load(s_ref.at[cols, grp], mask=m2, other=0)
                mn = plgpu.load(mn_ref.at[cols, grp], mask=m2, other=0)
            else:
                tile, s, mn = p_ref[cols, grp, :], s_ref[cols, grp], mn_ref[cols, grp]
            tiles.append((tile, s.astype(f32), mn.astype(f32)))

        def load_x(ref, r, c0):
            idx = (pl.ds(r, 1), grp, pl.ds(c0, half))
            v = plgpu.load(ref.at[idx], mask=gmask[None, :, None], other=0) if g_ragged else ref[idx]
            return v[0].astype(f32)

        def load_words(ref, r):  # (lo01, lo23, hi01, hi23) uint32 [gpb, G/8]
            out = []
            for h in (0, 1):
                for e in (0, 1):
                    if g_ragged:  # traced scalar indices: the masked load's interpret rule needs shapes
                        idx = (jnp.int32(r), grp, jnp.int32(h), slice(None), jnp.int32(e))
                        out.append(plgpu.load(ref.at[idx], mask=gmask[:, None], other=0))
                    else:
                        out.append(ref[r, grp, h, :, e])
            return out

        gw = [load_x(g_ref, 0, c0) for c0 in (0, half)] if g_ref is not None else None
        gwords = load_words(gw_ref, 0) if gw_ref is not None else None
        xs, sq, xws = [], [], []
        for r in range(m):
            v = [load_x(x_ref, r, c0) for c0 in (0, half)]
            if norm is not None:
                sq.append(v[0] * v[0] + v[1] * v[1])  # [gpb, G/2], for the norm's sum of squares
            if gw is not None:
                v = [v[0] * gw[0], v[1] * gw[1]]
            xs += v
            if xw_ref is not None:
                words = load_words(xw_ref, r)
                if gwords is not None:
                    words = [mul16_words(a, b, fma16, asm=bool(asm)) for a, b in zip(words, gwords)]
                xws.append(tuple(words))
        return tuple(tiles), tuple(xs), tuple(sq), tuple(xws)

    def compute(data, carry):
        tiles, xs, sq, xws = data
        accs, ss = carry
        ss = tuple(a + b for a, b in zip(ss, sq)) if ss_in_loop else ss
        # per row, sum(x) of each group [gpb]: once, whatever the column sets (gate | up)
        xsums = [jnp.sum(xs[2 * r], axis=1) + jnp.sum(xs[2 * r + 1], axis=1) for r in range(m)]
        out = []
        for (tile, s, mn), accs_c in zip(tiles, accs):
            if fma16 is not None:  # tile: uint32 words [bn, gpb, G/8]; codes centered (c - 8)
                outc = []
                for r in range(m):
                    xw = [jnp.broadcast_to(v[None], tile.shape) for v in xws[r]]
                    d = jnp.sum(word_dot16(tile, xw, fma16, asm=bool(asm)), axis=2)  # [bn, gpb]
                    outc.append(accs_c[r] + d * s + xsums[r][None, :] * (mn + CENTER * s))
                out.append(tuple(outc))
                continue
            if asm is None:
                t32 = tile.astype(jnp.uint32)
                lo = lax.bitcast_convert_type((t32 & 0xF) | _F32_MAGIC[0], f32) - _F32_MAGIC[1]
                hi = lax.bitcast_convert_type((t32 >> 4) | _F32_MAGIC[0], f32) - _F32_MAGIC[1]
            else:  # 128 + code (no subtraction per code; the offset leaves through sum(x) below)
                lo, hi = nibbles_f32(tile, asm=asm)
            outc = []
            for r in range(m):
                xl, xh = xs[2 * r], xs[2 * r + 1]
                d = jnp.sum(lo * xl[None] + hi * xh[None], axis=2)  # [bn, gpb]
                if asm is not None:
                    d = d - MAGIC_F32[1] * xsums[r][None, :]
                outc.append(accs_c[r] + d * s + xsums[r][None, :] * mn)
            out.append(tuple(outc))
        return tuple(out), ss

    ss_in_loop = norm is not None and not split_out
    res = []
    if r_ref is not None:  # tiny, loaded up front so its latency hides behind the loop
        for r in range(m):
            idx = (pl.ds(r, 1), col_sets[0])
            v = plgpu.load(r_ref.at[idx], mask=cmask.reshape(1, block_n), other=0) if n_ragged else r_ref[idx]
            res.append(v.astype(f32))
    accs = tuple(tuple(jnp.zeros((block_n, gpb), f32) for _ in range(m)) for _ in col_sets)
    ss = tuple(jnp.zeros((gpb, half), f32) for _ in range(m)) if ss_in_loop else ()
    if prefetch:
        def body(i, carry):
            acc_ss, cur = carry
            nxt = load_step(jnp.minimum(i + 1, steps - 1))  # the last step re-loads itself (unused)
            return compute(cur, acc_ss), nxt

        (accs, ss), _ = lax.fori_loop(0, steps, body, ((accs, ss), load_step(0)))
    else:
        accs, ss = lax.fori_loop(0, steps, lambda i, c: compute(load_step(i), c), (accs, ss))

    inv = None
    if ss_in_loop:
        inv = [lax.rsqrt(jnp.sum(v) / norm[0] + norm[1]) for v in ss]
    elif norm is not None:
        inv = [_inv_rms(x_ref, r, ng, norm) for r in range(m)]
    for r in range(m):
        ys = [jnp.sum(a[r], axis=1).reshape(1, block_n) for a in accs]
        if inv is not None:
            ys = [y * inv[r] for y in ys]
        if rope is not None:
            _rope_cache_epilogue(rope, r, ys, rest, head, c_in, q_out, bk_out, bv_out, x_ref.dtype)
            continue
        if split_out:
            for cols, y in zip(col_sets, ys):
                idx = (pl.ds(sk, 1), pl.ds(r, 1), cols)
                _store(o_ref, idx, y.reshape(1, 1, block_n), cmask)
            continue
        y = ys[0] if not paired else ys[0] * _sigmoid(ys[0]) * ys[1]
        if res:
            y = y + res[r]
        _store(o_ref, (pl.ds(r, 1), col_sets[0]), y.astype(o_ref.dtype), cmask)


class _RopeCache(NamedTuple):
    """What `int4_qkv_to_cache`'s epilogue needs to know (static)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rows: int  # query rows per KV head (qkv_to_cache.query_rows_count)
    slots: int  # buffer slots (Sb)
    scale: float  # sm_scale * log2(e)
    bias: bool
    mosaic: bool  # the queries in the Mosaic attention's layout


def _rope_cache_epilogue(rope, r, ys, refs, head, c_in, q_out, bk_out, bv_out, dtype):
    """Row r's two [1, bn] halves of one head -> qkv_to_cache's stores, with its arithmetic: the
    projections rounded to their dtype (and the bias added), rope in float32 rounded to the
    dtype, the queries then scaled; keys and values into the buffer at the row's slot."""
    from pallas_kernels.qkv_to_cache import rope_halves

    f32 = jnp.float32
    cos_ref, sin_ref, slot_ref, *rest = refs
    b_ref = rest[0] if rope.bias else None
    h, kvh, d = rope.num_heads, rope.num_kv_heads, rope.head_dim
    half, bn = d // 2, ys[0].shape[1]
    r_per_kv = h // kvh
    sides = (pl.ds(c_in, bn), pl.ds(c_in + half, bn))
    x = [y.astype(dtype) for y in ys]
    if b_ref is not None:  # the unfused path adds the bias to the rounded projection, in its dtype
        x = [(v.astype(f32) + b_ref[pl.ds(head * d + c_in + i * half, bn)].astype(f32)[None]).astype(dtype)
             for i, v in enumerate(x)]
    x1, x2 = (v.astype(f32) for v in x)
    c1, c2 = (cos_ref[pl.ds(r, 1), c] for c in sides)
    s1, s2 = (sin_ref[pl.ds(r, 1), c] for c in sides)
    roped = rope_halves(x1, x2, c1, c2, s1, s2, dtype)
    slot = slot_ref[r]
    ok = jnp.full((1, bn), slot < rope.slots)

    def buffer(ref, vals, kv):
        for val, c in zip(vals, sides):
            plgpu.store(ref.at[pl.ds(r, 1), kv, pl.ds(slot, 1), c], val.astype(ref.dtype)[None], mask=ok[None])

    pl.when((head >= h) & (head < h + kvh))(lambda: buffer(bk_out, roped, head - h))
    pl.when(head >= h + kvh)(lambda: buffer(bv_out, x, head - h - kvh))

    def query():
        kv, row = head // r_per_kv, head % r_per_kv
        for i, val in enumerate(roped):
            q = (val.astype(f32) * rope.scale).astype(q_out.dtype)
            if rope.mosaic:  # [B, KVH, 2, rows, D/2]: channel half i
                q_out[pl.ds(r, 1), kv, jnp.int32(i), pl.ds(row, 1), pl.ds(c_in, bn)] = q[None]
            else:  # [B, KVH, rows, D]
                q_out[pl.ds(r, 1), kv, pl.ds(row, 1), sides[i]] = q[None]
        # the padded query rows (the KV head's first query head): zeros
        pad = (jnp.arange(rope.rows, dtype=jnp.int32) >= r_per_kv) & (row == 0)
        zeros = jnp.zeros((1, rope.rows, bn), q_out.dtype)
        for i in range(2):
            if rope.mosaic:
                dst = q_out.at[pl.ds(r, 1), kv, jnp.int32(i), pl.ds(0, rope.rows), pl.ds(c_in, bn)]
            else:
                dst = q_out.at[pl.ds(r, 1), kv, pl.ds(0, rope.rows), sides[i]]
            plgpu.store(dst, zeros, mask=jnp.broadcast_to(pad[None, :, None], zeros.shape))
    pl.when(head < h)(query)


def _sigmoid(y):
    return 1.0 / (1.0 + jnp.exp(-y))


def _store(ref, idx, y, cmask):
    if cmask is None:
        ref[idx] = y
    else:
        plgpu.store(ref.at[idx], y, mask=cmask.reshape(y.shape))


def _norm_chunk(ng: int, g: int) -> int:
    """Groups per load of the RMS pass: the largest power of 2 dividing ng, at most 4096 values."""
    c = ng & -ng
    while c * g > 4096:
        c //= 2
    return max(c, 1)


def _inv_rms(x_ref, r, ng, norm):
    """rsqrt(sum(x_r**2) / K + eps) from x [M, ng, G] (zero padded past K)."""
    k_true, eps = norm
    g = x_ref.shape[2]
    c = _norm_chunk(ng, g)

    def body(i, acc):
        v = x_ref[pl.ds(r, 1), pl.ds(i * c, c), :][0].astype(jnp.float32)  # [c, G]
        return acc + jnp.sum(v * v, axis=1)

    ss = lax.fori_loop(0, ng // c, body, jnp.zeros((c,), jnp.float32))
    return lax.rsqrt(jnp.sum(ss) / k_true + eps)


def _int4_dot_kernel(x_ref, p_ref, s_ref, mn_ref, o_ref, *, m, mp, n, ng, half, block_n, gpb, gps, steps,
                     n_ragged, split_out, cdt, magic, asm):
    """Tensor-core variant for M > 2: per group, acc[bn, mp] += (lo . x_lo^T + hi . x_hi^T) * s
    + min * sum(x_g). The K-major tile [bn, G/2] is already the row-major A operand of the
    dot; x (rows padded to mp >= 16 by masked loads) is B. Every group of the step is
    loaded before the first is computed (more bytes in flight)."""
    f32 = jnp.float32
    prec = lax.Precision.HIGHEST if cdt == jnp.dtype(jnp.float32) else None
    sk, g_begin, g_end, cmask, n0 = _program_block(n=n, ng=ng, block_n=block_n, gps=gps, n_ragged=n_ragged)
    cols = pl.ds(n0, block_n)
    rmask = (jnp.arange(mp, dtype=jnp.int32) < m)[:, None]

    def load_group(gi):
        gc = jnp.minimum(gi, g_end - 1)  # a step's groups past the split's end: clamped, weighted 0
        if n_ragged:
            tile = plgpu.load(p_ref.at[cols, gc, :], mask=cmask[:, None], other=0)
            s = plgpu.load(s_ref.at[cols, gc], mask=cmask, other=0)
            mn = plgpu.load(mn_ref.at[cols, gc], mask=cmask, other=0)
        else:
            tile, s, mn = p_ref[cols, gc, :], s_ref[cols, gc], mn_ref[cols, gc]
        valid = gi < g_end
        s = jnp.where(valid, s.astype(f32), 0.0)
        mn = jnp.where(valid, mn.astype(f32), 0.0)
        xl = plgpu.load(x_ref.at[pl.ds(0, mp), gc, pl.ds(0, half)], mask=rmask, other=0).astype(f32)
        xh = plgpu.load(x_ref.at[pl.ds(0, mp), gc, pl.ds(half, half)], mask=rmask, other=0).astype(f32)
        return tile, s, mn, xl, xh

    def compute(data, acc):
        tile, s, mn, xl, xh = data
        if magic is not None:  # nibble -> 16-bit float (offset + c) by bit operations, no conversion
            lo, hi = nibbles16(tile, cdt, asm=asm)
        else:
            lo, hi = (tile & 0xF).astype(cdt), (tile >> 4).astype(cdt)
        dims = (((1,), (1,)), ((), ()))
        d = (lax.dot_general(lo, xl.astype(cdt), dims, precision=prec, preferred_element_type=f32)
             + lax.dot_general(hi, xh.astype(cdt), dims, precision=prec, preferred_element_type=f32))  # [bn, mp]
        xsum = jnp.sum(xl, axis=1) + jnp.sum(xh, axis=1)  # [mp]
        if magic is not None:  # remove the offset: sum((off + c) x) = off * sum(x) + sum(c x)
            d = d - magic[1] * xsum[None, :]
        return acc + d * s[:, None] + mn[:, None] * xsum[None, :]

    def body(i, acc):
        g0 = g_begin + i * gpb
        data = [load_group(g0 + u) for u in range(gpb)]
        for u in range(gpb):
            acc = compute(data[u], acc)
        return acc

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_n, mp), f32))
    y = acc.T  # [mp, bn]
    mask = rmask if cmask is None else rmask & cmask[None, :]
    if split_out:
        plgpu.store(o_ref.at[pl.ds(sk, 1), pl.ds(0, mp), cols], y.reshape(1, mp, block_n), mask=mask[None])
    else:
        plgpu.store(o_ref.at[pl.ds(0, mp), cols], y.astype(o_ref.dtype), mask=mask)


def words32(packed):
    """uint8 [..., B] (B % 4 == 0) -> uint32 [..., B/4], byte i of a word at bits 8i..8i+7 (the same
    memory: XLA makes this a bitcast, no copy)."""
    *lead, nb = packed.shape
    return lax.bitcast_convert_type(packed.reshape(*lead, nb // 4, 4), jnp.uint32)


def activation_words(x3):
    """x [M, ng, G] in a 16-bit dtype -> uint32 [M, ng, 2, G/8, 2]: [r, g, h, j, e] holds the pair
    x[r, g, h*G/2 + 4j + 2e + (0, 1)], the activations of the low (h = 0) or high (h = 1) codes of
    bytes 4j + 2e and 4j + 2e + 1 of the group's packed codes (`nibbles.word_dot16`)."""
    m, ng, g = x3.shape
    pairs = lax.bitcast_convert_type(x3, jnp.uint16).reshape(m, ng, 2, g // 8, 2, 2)
    return lax.bitcast_convert_type(pairs, jnp.uint32)


def _groups(a, ng: int, group_size: int):
    """[R, K] -> [R, ng, G], K zero-padded to ng * G (a ragged last group)."""
    k = a.shape[1]
    return (a if k == ng * group_size else jnp.pad(a, ((0, 0), (0, ng * group_size - k)))).reshape(
        a.shape[0], ng, group_size)


def _reduce_operands(x3, packed, norm_weight, residual, fma16: bool):
    """The "reduce" kernel's operands after x3 and before its outputs, in the order `_int4_kernel`
    takes its refs: (packed, uint32 words of four codes with fma16; [the norm weight [1, ng, G]],
    [residual], and with fma16 x's words [and the norm weight's])."""
    gw3 = None if norm_weight is None else _groups(norm_weight.reshape(1, -1), x3.shape[1], x3.shape[2])
    extra = [a for a in (gw3, residual) if a is not None]
    if fma16:
        packed = words32(packed)  # [N, ng, G/8]: four bytes per word, same memory
        extra.append(activation_words(x3))
        if gw3 is not None:
            extra.append(activation_words(gw3.astype(x3.dtype)))
    return packed, extra


def resolve_path(m: int, path: str, block_n, groups_per_step, n: int | None = None):
    """(path, block_n, groups_per_step) where the caller left "auto" / None: M <= 2 takes the
    CUDA-core "reduce" kernel (block_n 16, 8 groups per step; M = 1: 16 groups per step, and
    block_n 8 when N <= M1_NARROW_N), M > 2 the tensor-core "dot" kernel (block_n 64, 1 group per
    step). H100 (docs/results/kernels_sweep7_paths_m2_m8_h100.json): the reduce kernel's work
    grows with M (qkv shape: 10.5 / 19.2 / 49.2 us at M = 1 / 2 / 8), the dot kernel's does not
    (21.7 / 21.9 us at M = 2 / 8)."""
    if path == "auto":
        path = "reduce" if m <= 2 else "dot"
    if path not in ("reduce", "dot"):
        raise Int4ShapeError(f"path must be 'auto', 'reduce' or 'dot', got {path!r}")
    reduce_gpb = M1_GROUPS_PER_STEP if m == 1 else DEFAULT_GROUPS_PER_STEP
    reduce_bn = M1_NARROW_BLOCK_N if m == 1 and n is not None and n <= M1_NARROW_N else DEFAULT_BLOCK_N
    dflt = {"reduce": (reduce_bn, reduce_gpb), "dot": (DOT_BLOCK_N, DOT_GROUPS_PER_STEP)}[path]
    return path, dflt[0] if block_n is None else block_n, dflt[1] if groups_per_step is None else groups_per_step


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "groups_per_step", "split_k", "num_warps",
                                             "num_stages", "prefetch", "path", "magic", "asm", "interpret",
                                             "norm_eps", "act", "fma16", "rms_only"))
def int4_matmul(x, packed, scale, minimum, *, group_size: int, block_n: int | None = None,
                groups_per_step: int | None = None, split_k: int | None = None, num_warps: int = 4,
                num_stages: int = 1, prefetch: bool | None = None, path: str = "auto", magic: bool = True,
                asm: bool | None = None, interpret: bool = False, norm_weight=None, norm_eps: float = 1e-6,
                residual=None, act: str | None = None, fma16: bool | None = None, rms_only: bool = False):
    """Pallas INT4 matmul; same contract as `int4_matmul_reference` (returns x.dtype [M, N]),
    and with the fused forms of `int4_fused_reference` (norm_weight / act / residual).

    x [M, K] bf16/f16/f32 (M <= MAX_M = 8, K <= n_groups*G; a ragged last group is
    zero-padded), packed uint8 [N, n_groups, G/2], scale/min f16 [N, n_groups].
    path: "reduce" (CUDA-core, reductions along K; the M <= 2 default), "dot" (tensor-core
    dots; the M > 2 default) or "auto". block_n: output columns per program (power of 2,
    4..256). groups_per_step: K groups per loop step (power of 2; capped at the next power
    of 2 of n_groups). None: the path's default (`resolve_path`). split_k: programs along
    K (None: auto, see `split_plan`); partials are summed by XLA. prefetch ("reduce"
    only): load step i+1 before computing step i (None: at M = 1 when a program makes at least
    PREFETCH_MIN_STEPS loop steps, i.e. the down projection). magic ("dot" with bf16/f16 x): nibbles
    become 16-bit floats by bit operations (bf16 0x4300|c = 128 + c), the offset removed
    through x's group sums, instead of integer->float conversions. asm: do the bit tricks with
    inline PTX, 4 bytes per instruction group (`pallas_kernels.nibbles`; "reduce" then takes 128 +
    code in f32 and removes the offset through sum(x); interpret mode runs the same bits in jnp).
    None: on where the device takes PTX (`ptx_available`), and in interpret mode.
    num_warps / num_stages: Triton's.
    fma16 ("reduce" with bf16 / f16 x): the packed 16-bit inner product (`nibbles.word_dot16`);
    None: on wherever asm is (interpret mode: the same words, float32 arithmetic).
    interpret: Pallas interpret mode (any backend; for tests).
    Fused forms (what a decoder layer needs around its GEMVs, so the draft step launches fewer
    small kernels): norm_weight [K] (RMSNorm of x first, eps norm_eps), act="silu_mul" (W's
    columns are gate | up; output silu(gate) * up, N/2 columns), residual [M, N_out] (added).
    rms_only (norm_weight None): the RMSNorm without a weight, for W with the norm weight folded
    into its rows; the kernel then neither loads nor applies a weight.
    The "reduce" kernel does them in-kernel (block_n defaults to half for "silu_mul": a program
    owns a gate and an up tile); the "dot" kernel and split-K partial sums finish in XLA.
    """
    if asm is None:
        asm = interpret or ptx_available()
    if act not in ACTIVATIONS:
        raise Int4ShapeError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    paired = act == "silu_mul"
    n_w = packed.shape[0] if packed.ndim == 3 else None
    if paired and n_w is not None and n_w % 2:
        raise Int4ShapeError(f"act='silu_mul' needs an even number of columns (gate | up), got N={n_w}")
    n_out = n_w // 2 if paired and n_w is not None else n_w
    bn_given = block_n
    path, block_n, groups_per_step = resolve_path(x.shape[0] if x.ndim == 2 else 1, path, block_n,
                                                  groups_per_step, n=n_out)
    if paired and bn_given is None and path == "reduce":
        block_n = max(4, block_n // 2)  # two tiles per program: keep its bytes per step
    check_int4_matmul_args(x.shape, packed.shape, scale.shape, minimum.shape, group_size, block_n,
                           groups_per_step, split_k, num_warps, x_dtype=x.dtype, packed_dtype=packed.dtype)
    m, k = x.shape
    n, ng, half = packed.shape
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise Int4ShapeError(f"norm_weight must be [K] = [{k}], got shape {tuple(norm_weight.shape)}")
    if rms_only and norm_weight is not None:
        raise Int4ShapeError("rms_only is the norm without a weight: pass norm_weight=None with it")
    if rms_only and path == "dot":  # XLA normalizes around the tensor-core kernel: with a weight of ones
        norm_weight = jnp.ones((k,), x.dtype)
    if residual is not None and tuple(residual.shape) != (m, n_out):
        raise Int4ShapeError(f"residual must be [M, N_out] = {(m, n_out)}, got shape {tuple(residual.shape)}")
    if path == "dot" and (norm_weight is not None or paired or residual is not None):
        # the tensor-core kernel has no fused forms: XLA does them around it
        y = int4_matmul(normed_input(x, norm_weight, norm_eps), packed, scale, minimum, group_size=group_size,
                        block_n=block_n, groups_per_step=groups_per_step, split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                        path=path, magic=magic, asm=asm, interpret=interpret)
        return fused_epilogue(y.astype(jnp.float32), act=act, residual=residual).astype(x.dtype)
    gpb = min(groups_per_step, _next_pow2(ng))
    n_blocks = -(-n_out // block_n)
    splits, gps = split_plan(ng, n_blocks, gpb, split_k)
    steps = -(-gps // gpb)
    if prefetch is None:  # long K only (H100, session 10: down 16.1 -> 15.3 us, qkv 8.0 -> 10.6 us)
        prefetch = path == "reduce" and m == 1 and steps >= PREFETCH_MIN_STEPS
    g_ragged = gps % gpb != 0 or ng % gps != 0  # some step reads groups past its split's end
    x3 = _groups(x, ng, group_size)
    split_out = splits > 1
    extra = []
    if path == "dot":
        out_shape = (splits, m, n) if split_out else (m, n)
        cdt = jnp.dtype(x.dtype) if jnp.dtype(x.dtype) in SUPPORTED_DTYPES[:2] else jnp.dtype(jnp.float32)
        kernel = functools.partial(_int4_dot_kernel, m=m, mp=max(16, _next_pow2(m)), n=n, ng=ng, half=half,
                                   block_n=block_n, gpb=gpb, gps=gps, steps=steps, n_ragged=n % block_n != 0,
                                   split_out=split_out, cdt=cdt, magic=MAGIC16.get(cdt) if magic else None,
                                   asm=asm and not interpret)
    else:
        out_shape = (splits, m, n) if split_out else (m, n_out)
        if fma16 is None:
            fma16 = bool(asm) and jnp.dtype(x.dtype) in SUPPORTED_DTYPES[:2]
        f16dt = jnp.dtype(x.dtype) if fma16 else None
        if fma16 and f16dt not in SUPPORTED_DTYPES[:2]:
            raise Int4ShapeError(f"fma16 needs bfloat16 or float16 activations, got {f16dt}")
        packed, extra = _reduce_operands(x3, packed, norm_weight, None if split_out else residual, fma16)
        kernel = functools.partial(_int4_kernel, m=m, n=n_out, ng=ng, half=half, block_n=block_n, gpb=gpb, gps=gps,
                                   steps=steps, n_ragged=n_out % block_n != 0, g_ragged=g_ragged,
                                   split_out=split_out, prefetch=prefetch,
                                   asm=(not interpret) if asm else None,
                                   norm=None if norm_weight is None and not rms_only else (k, float(norm_eps)),
                                   paired=paired, residual=residual is not None and not split_out, fma16=f16dt,
                                   weighted=norm_weight is not None)
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(n_blocks, splits),
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if split_out else x.dtype),
        compiler_params=params,
        interpret=interpret,
        name="int4_matmul",
    )(x3, packed, scale, minimum, *extra)
    if split_out:
        out = fused_epilogue(jnp.sum(out, axis=0), act=act, residual=residual).astype(x.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "norm_eps", "sm_scale", "q_layout",
                                             "block_n", "groups_per_step", "num_warps", "interpret"))
def int4_qkv_to_cache(x, packed, scale, minimum, norm_weight, cos, sin, buf_k, buf_v, slot, bias=None, *,
                      num_heads: int, num_kv_heads: int, norm_eps: float, sm_scale: float | None = None,
                      q_layout: str = "mosaic", block_n: int = M1_NARROW_BLOCK_N, groups_per_step: int | None = None,
                      num_warps: int = 4, interpret: bool = False):
    """A decode step's q / k / v projection (INT4, RMSNorm fused) and `qkv_to_cache` in one kernel:
    `qkv_to_cache_reference(norm_linear(x) (+ bias), ...)` without the projections' round trip
    through memory and the second launch.

    x [M, K] (one new token per row; M <= MAX_M), the layer's q | k | v INT4 weight (packed / scale /
    minimum, K-major, N = (H + 2 KVH) * D), norm_weight [K], cos / sin f32 [M, D] (the rows'
    rope tables), buf_k / buf_v [M, KVH, Sb, D] (updated in place when the caller donates or
    carries them), slot int32 [M] (the new token's buffer slot; >= Sb writes nothing), bias
    [N] or None (Qwen2). Returns (query rows, buf_k, buf_v) as `qkv_to_cache` does for q_layout
    "mosaic" (f16 [M, KVH, 2, rows, D/2]) or "rows" (f32 [M, KVH, rows, D]).

    Program j owns channels [c, c + block_n) and [c + D/2, +block_n) of head j // P (P = D / 2 /
    block_n programs per head): the rotary pairs, so the rope needs nothing from another program.
    The loop is `int4_matmul`'s ("reduce" path, no split-K); only the epilogue differs."""
    from pallas_kernels.qkv_to_cache import QkvToCacheError, query_layout

    m, k = x.shape
    n, ng, half = packed.shape
    h, kvh = num_heads, num_kv_heads
    d, _, rows, mosaic, q_type, q_scale = query_layout(n, m, 1, h, kvh, buf_k, buf_v, q_layout, sm_scale)
    group = 2 * half
    if groups_per_step is None:
        groups_per_step = M1_GROUPS_PER_STEP if m == 1 else DEFAULT_GROUPS_PER_STEP
    check_int4_matmul_args(x.shape, packed.shape, scale.shape, minimum.shape, group, block_n, groups_per_step, 1,
                           num_warps, x_dtype=x.dtype, packed_dtype=packed.dtype)
    if d % 2 or (d // 2) % block_n:
        raise QkvToCacheError(f"head_dim {d}: half of it must be a multiple of block_n {block_n}")
    if cos.shape != (m, d) or sin.shape != (m, d):
        raise QkvToCacheError(f"cos / sin must be [M, D] = [{m}, {d}], got {cos.shape}, {sin.shape}")
    if slot.shape != (m,) or tuple(norm_weight.shape) != (k,) or (bias is not None and bias.shape != (n,)):
        raise QkvToCacheError(f"slot [M], norm_weight [K] and bias [N] expected, got {slot.shape}, "
                              f"{norm_weight.shape}, {None if bias is None else bias.shape}")
    asm = interpret or ptx_available()
    fma16 = bool(asm) and jnp.dtype(x.dtype) in SUPPORTED_DTYPES[:2]
    gpb = min(groups_per_step, _next_pow2(ng))
    steps = -(-ng // gpb)
    x3 = _groups(x, ng, group)
    packed, extra = _reduce_operands(x3, packed, norm_weight, None, fma16)
    extra += [cos.astype(jnp.float32), sin.astype(jnp.float32), slot.astype(jnp.int32)]
    extra += [] if bias is None else [bias]
    rope = _RopeCache(num_heads=h, num_kv_heads=kvh, head_dim=d, rows=rows, slots=buf_k.shape[2], scale=q_scale,
                      bias=bias is not None, mosaic=mosaic)
    kernel = functools.partial(_int4_kernel, m=m, n=n, ng=ng, half=half, block_n=block_n, gpb=gpb, gps=ng,
                               steps=steps, n_ragged=False, g_ragged=ng % gpb != 0, split_out=False,
                               prefetch=m == 1 and steps >= PREFETCH_MIN_STEPS,
                               asm=(not interpret) if asm else None, norm=(k, float(norm_eps)), paired=False,
                               residual=False, fma16=jnp.dtype(x.dtype) if fma16 else None, weighted=True, rope=rope)
    n_in = 4 + len(extra)
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        kernel,
        grid=(n // (2 * block_n), 1),
        out_shape=[q_type, jax.ShapeDtypeStruct(buf_k.shape, buf_k.dtype),
                   jax.ShapeDtypeStruct(buf_v.shape, buf_v.dtype)],
        input_output_aliases={n_in: 1, n_in + 1: 2},
        compiler_params=params,
        interpret=interpret,
        name="int4_qkv_to_cache",
    )(x3, packed, scale, minimum, *extra, buf_k, buf_v)


def int4_qkv_to_cache_reference(x, qw, norm_weight, norm_eps, cos, sin, buf_k, buf_v, slot, bias=None, *,
                                num_heads: int, num_kv_heads: int, q_layout: str = "mosaic"):
    """The unfused composition `int4_qkv_to_cache` replaces (x [M, K], one token per row): the
    projection in x.dtype, the bias added, then `qkv_to_cache_reference`."""
    from pallas_kernels.qkv_to_cache import qkv_to_cache_reference

    qkv = int4_fused_reference(x, qw.packed, qw.scale, qw.minimum, group_size=qw.group_size,
                               norm_weight=norm_weight, norm_eps=norm_eps)
    if bias is not None:
        qkv = qkv + bias.astype(qkv.dtype)
    return qkv_to_cache_reference(qkv[:, None], cos[:, None], sin[:, None], buf_k, buf_v, slot, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, q_layout=q_layout)


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
    if qw.packed.ndim != 3:
        return f"packed has shape {tuple(qw.packed.shape)}, not the K-major [N, n_groups, G/2] layout"
    if not 1 <= m <= MAX_M:
        return f"M={m} rows outside 1..{MAX_M}"
    if dtype is not None and jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"activation dtype {jnp.dtype(dtype)} not supported"
    return None


def int4_linear(x, qw, *, backend: str = "auto", interpret: bool = False, norm_weight=None, norm_eps: float = 1e-6,
                residual=None, act: str | None = None, **kernel_kwargs):
    """y[..., N] = x[..., K] @ W for a `QuantizedWeight` qw, optionally in a fused form
    (`int4_fused_reference`: norm_weight, act="silu_mul", residual [..., N_out]).

    backend: "pallas" (raise Int4ShapeError, a ValueError, if the kernel cannot take the
    shapes), "reference" (`int4_matmul_reference` / `int4_fused_reference`), "dequant"
    (dequantize to x.dtype, then an XLA dot: what prefill wants), "auto" (pallas on GPU when
    supported; else dequant for more than MAX_M rows, silently: that is prefill; else the
    reference, and on GPU a warning once per reason). interpret=True runs the Pallas kernel in
    interpret mode (any backend). kernel_kwargs go to `int4_matmul` (block_n, groups_per_step, ...).
    """
    *lead, k = x.shape
    if k != qw.in_features:
        raise ValueError(f"x has {k} features, the weight expects {qw.in_features}")
    m = math.prod(lead) if lead else 1
    x2 = x.reshape(m, k)
    fused = dict(norm_weight=norm_weight, norm_eps=norm_eps, act=act,
                 residual=None if residual is None else residual.reshape(m, -1))
    if backend == "auto":
        reason = pallas_unsupported_reason(m, qw, x.dtype)
        if reason is None and (_on_gpu() or interpret):
            backend = "pallas"
        elif m > MAX_M:
            backend = "dequant"
        else:
            if reason is not None and _on_gpu() and reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(f"int4_linear: Pallas kernel not used ({reason}); falling back to XLA")
            backend = "reference"
    if backend == "pallas":
        reason = pallas_unsupported_reason(m, qw, x.dtype)
        if reason is not None:
            raise Int4ShapeError(f"int4_linear(backend='pallas'): {reason}")
        y = int4_matmul(x2, qw.packed, qw.scale, qw.minimum, group_size=qw.group_size, interpret=interpret,
                        **fused, **kernel_kwargs)
    elif backend == "reference":
        y = int4_fused_reference(x2, qw.packed, qw.scale, qw.minimum, group_size=qw.group_size, **fused)
    elif backend == "dequant":
        from qspec_jax.quant_weights import dequantize_weight
        w = dequantize_weight(qw, x.dtype, out_major=True)  # [N, K]: the layout's orientation, no transpose
        y = lax.dot_general(normed_input(x2, norm_weight, norm_eps), w, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
        y = fused_epilogue(y, act=act, residual=fused["residual"]).astype(x.dtype)
    else:
        raise ValueError(f"unknown backend {backend!r} (auto, pallas, reference, dequant)")
    return y.reshape(*lead, y.shape[-1])
