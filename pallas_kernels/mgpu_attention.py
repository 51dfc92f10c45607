"""Attention over the hierarchical cache in Mosaic GPU (H100 / sm_90a), swap AB: the draft's
one-token steps (upper planes) and the target's verify pass (both planes, gamma + 1 tokens).

The decoder's Pallas path on sm_90 GPUs (`hier_attention(history="mosaic")`, chosen by
`ForwardOptions.draft_history` / `target_history`; `merge_partials` combines the
partials). H100 (docs/benchmarks.md, session 15): the draft's attention with its buffer and merge
at 20.7 / 60.2 us at 32K / 128K (Llama-3.1-8B shape; session 12's Triton `hier_attention`: 28.4 /
88.7), 2.37 TB/s of planes and statistics at 128K; the target's, T = 4, 34.0 / 103.7 us.

Per program (row * KV head, split), one warpgroup, over 128-token steps fed by a TMA pipeline:
- keys: the planes are dequantized in registers to c * scale + minimum ([tokens, D/2] f16 per
  channel half, inline PTX on two elements per 32-bit register: a 4-bit code for the draft, the
  INT8 code 16 U + L for the target) and are wgmma's A; B is the matching half of the query rows
  ([N, D/2] f16, transposed), so the scores come out as [tokens, N] and the softmax reduces over
  axis 0 (across the warpgroup's warps);
- values: p (f16, to shared memory) is the B [tokens, N] of two wgmmas whose A are the two
  dequantized channel halves of the token-minor value block [D/2, tokens], as the cache stores it;
- each program writes its unnormalized partial output transposed, [D, N], its running maximum
  and its sum (log2 domain) for all N rows; rows past the caller's are zero-query padding.

Query rows (wgmma's N = 16 or 32): column t * R + r is query head r of new token t. The history's
groups are dealt round-robin (program p takes groups p, p + splits, ...: its first ones are fetched
before the rows' lengths arrive) up to each row's quantized prefix (the largest over its tokens), so
a short row reads only its own groups; empty programs write m = -1e30, l = 0, o = 0. With several
tokens, a token's columns mask the history past its own prefix (only the last group can differ)
and the buffer slots outside [its prefix, its position].

`interpret=True` runs Mosaic GPU's interpreter on the CPU (tests): it has no rule for inline
PTX, for wgmma with A in registers or for accumulators in `pl.run_state`, so there the same
arithmetic runs in jnp, A goes through shared memory and each product has its own accumulator.
"""
from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

ROW_TILES = (16, 32)  # query rows per (row, KV head): wgmma's N (P as B needs rows of >= 32 bytes)
HEAD_DIM = 128
GROUP = 128  # tokens per step = the key statistics' group
TB = 64  # buffer slots per step
MASKED = -2e30  # a masked score: below the running maximum's start (-1e30), so its p is exactly 0
WGMMA = plgpu.Layout.WGMMA
COL = plgpu.Layout.WGMMA.reduce(0)  # an [N] vector broadcast along the token axis of [tokens, N]


class MosaicAttentionError(ValueError):
    """Shapes the Mosaic GPU attention does not support (raised before launch)."""


def _codes(x, lower, high: bool):
    """The interpreter's codes (jnp int32): the 4-bit code, or 16 U + L with the lower plane."""
    u = x.astype(jnp.int32)
    if lower is None:
        return ((u >> 4) & 0xF) if high else (u & 0xF)
    lo = lower.astype(jnp.int32)
    return (u & 0xF0) | ((lo >> 4) & 0xF) if high else ((u & 0xF) << 4) | (lo & 0xF)


# Draft (one plane): one prmt spreads a register's two bytes to [b0, 0, b1, 0] and one shl moves
# the low nibbles up to the high nibbles' place; each nibble then takes one lop3 ((t & 0xF0) |
# 0x5400: f16 64 + c, exact) and one fma with the minimum given as mn - 64 s: 6 instructions per 4
# elements (session 12's form, with the low nibble at bits 0-3 as 1024 + c, needed a sub of 1024
# for each: 7). The offset 64 s rounds to <= 1/32 of a step in f16; 1024 s would round to half.
_ASM4 = ("{ .reg .b32 t, u, k; prmt.b32 t, $2, 0, 0x4140; shl.b32 u, t, 4; mov.b32 k, 0x54005400; "
         "lop3.b32 $0, u, 0x00F000F0, k, 0xEA; lop3.b32 $1, t, 0x00F000F0, k, 0xEA; "
         "fma.rn.f16x2 $0, $0, $3, $4; fma.rn.f16x2 $1, $1, $5, $6; }")
# Target (both planes): v = [U0, 0x64, U1, 0x64], w = [L0, 0x64, L1, 0x64]; the high channel's
# code (U & 0xF0) | (L >> 4) and the low one's (U << 4 & 0xF0) | (L & 0xF) each come out of one
# lop3 selecting bits ((a & c) | (b & ~c): 0xE4) under the exponent byte, as f16 1024 + code.
_ASM8 = ("{ .reg .b32 v, w, a, b, k; prmt.b32 v, $2, 0x64, 0x4140; prmt.b32 w, $3, 0x64, 0x4140; "
         "shr.b32 a, w, 4; shl.b32 b, v, 4; mov.b32 k, 0x64006400; "
         "lop3.b32 $1, v, a, 0xFFF0FFF0, 0xE4; lop3.b32 $0, b, w, 0x00F000F0, 0xE4; "
         "sub.f16x2 $0, $0, k; sub.f16x2 $1, $1, k; "
         "fma.rn.f16x2 $0, $0, $4, $5; fma.rn.f16x2 $1, $1, $6, $7; }")


def pair_asm(shape, asm: str, constraints: str, planes: int, n_args: int):
    """Inline Mosaic GPU on register pairs: per register index, the 16-bit registers of `planes`
    int8 [rows, cols] tiles (two bytes each, zero-extended) and the 32-bit registers of the
    n_args - planes f16 arrays after them (same WGMMA layout) go into `asm`, which writes two
    f16x2 registers: the (low, high) f16 results."""
    from jax.experimental import mosaic
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    utils = mosaic.gpu.utils
    out = plgpu.ShapeDtypeStruct(shape, jnp.float16, layout=WGMMA)

    @plgpu.inline_mgpu(arg_types=(WGMMA,) * n_args, return_type=(out, out))
    def unpack(ctx, *arrays):
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        pair = ir.Type.parse("!llvm.struct<(i32, i32)>")
        out_ty = ir.VectorType.get((2,), ir.F16Type.get())
        x = arrays[0]
        lo, hi = np.empty_like(x.registers), np.empty_like(x.registers)
        for idx in np.ndindex(*x.registers.shape):
            ins = [arith.extui(i32, utils.bitcast(a.registers[idx], i16)) for a in arrays[:planes]]
            ins += [utils.bitcast(a.registers[idx], i32) for a in arrays[planes:]]
            res = llvm.inline_asm(pair, ins, asm, constraints)
            lo[idx] = utils.bitcast(llvm.extractvalue(i32, res, [0]), out_ty)
            hi[idx] = utils.bitcast(llvm.extractvalue(i32, res, [1]), out_ty)
        mk = lambda regs: mosaic.gpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=None)  # noqa: E731
        return mk(lo), mk(hi)
    return unpack


def unpack_asm(shape, planes: int):
    """Inline Mosaic GPU: int8 [rows, cols] plane tiles (the cache's bytes; `planes` of them) + the
    low and the high channel's f16 scale / minimum in the same WGMMA layout -> (low, high) f16
    code * scale + minimum."""
    asm, cons = (_ASM4, "=r,=r,r,r,r,r,r") if planes == 1 else (_ASM8, "=r,=r,r,r,r,r,r,r")
    return pair_asm(shape, asm, cons, planes, planes + 4)


def dequant(x, lower, low, high, interpret: bool, stats_axis: int = 1):
    """int8 tile [rows, cols] (+ the lower plane's, or None) -> the (low, high) channel halves as
    code * scale + minimum in f16; low / high = (scale, minimum) f16 vectors along x's axis
    `stats_axis`, broadcast along the other (1: [cols] in COL layout, the cache's per-channel
    statistics; 0: [rows] in ROW layout, a weight tile's per-row ones): the plane's own statistics
    for the 4-bit code, (s / 16, mn - s / 2) for the INT8 code."""
    bc = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, x.shape, [stats_axis]), WGMMA)  # noqa: E731
    if interpret:  # the same arithmetic in jnp (no inline PTX under the interpreter)
        return tuple(plgpu.layout_cast(_codes(x, lower, h).astype(jnp.float16) * bc(sc) + bc(mn), WGMMA)
                     for h, (sc, mn) in ((False, low), (True, high)))
    if lower is None:  # the codes come as f16 64 + c: (s, mn - 64 s) (f16x2 arithmetic: 64 s exact, one rounding)
        offset = lambda st: (st[0], st[1] - st[0] * jnp.float16(64))  # noqa: E731
        # (the values pass one statistics pair for both halves: offset it once)
        low, high = (offset(low),) * 2 if high is low else (offset(low), offset(high))
    planes = [plgpu.layout_cast(x, WGMMA)] + ([] if lower is None else [plgpu.layout_cast(lower, WGMMA)])
    return unpack_asm(x.shape, len(planes))(*planes, bc(low[0]), bc(low[1]), bc(high[0]), bc(high[1]))


def int8_stats(scale, minimum):
    """A group's f16 (s, mn) -> the INT8 code's (s / 16, mn - s / 2) in f16 (kv_quant: X8 =
    (16 U + L) * s / 16 + mn - s / 2)."""
    # in f16x2 arithmetic: s / 16 and s / 2 are exact and the difference rounds once, as through f32
    # (bit-identical), in a quarter of the instructions (H100: verify T = 8 at 128K 123 -> 117 us)
    return scale * jnp.float16(1 / 16), minimum - scale * jnp.float16(0.5)


def row_tile(rows: int) -> int:
    """wgmma's N for `rows` query rows: 16 or 32 (MosaicAttentionError above 32)."""
    for n in ROW_TILES:
        if rows <= n:
            return n
    raise MosaicAttentionError(f"at most {ROW_TILES[-1]} query rows per KV head (T * R), got {rows}")


def mosaic_query_rows(q_rows, dtype=jnp.float16):
    """The attention's query rows f32 [B, KVH, rows <= 32, D] (`qkv_to_cache.query_rows`: scaled,
    log2 domain) -> the kernel's B operands [B, KVH, 2, N, D/2] in dtype (channel halves, zero
    rows; N = `row_tile(rows)`)."""
    b, kvh, rows, d = q_rows.shape
    n = row_tile(rows)
    q = jnp.pad(q_rows, ((0, 0), (0, 0), (0, n - rows), (0, 0))).astype(dtype)
    return q.reshape(b, kvh, n, 2, d // 2).transpose(0, 1, 3, 2, 4)


def check_args(q16, k_upper, k_scale, k_min, v_upper, v_scale, v_min, qlen, group_size, buffer=None, k_lower=None,
               v_lower=None, q_per_token=None):
    """MosaicAttentionError unless `attention_partials` takes these arrays (anything with .shape and
    .dtype)."""
    err = MosaicAttentionError
    b, kvh, sq, half = k_upper.shape
    d = 2 * half
    if d != HEAD_DIM or group_size != GROUP:
        raise err(f"head_dim {HEAD_DIM} and group size {GROUP} only, got {d} and {group_size}")
    if (k_lower is None) != (v_lower is None):
        raise err("k_lower and v_lower come together (the target's INT8 view) or not at all (the draft's)")
    if len(qlen.shape) != 2 or qlen.shape[0] != b:
        raise err(f"qlen must be int32 [B, T] = [{b}, T], got {qlen.shape}")
    t = qlen.shape[1]
    n = q16.shape[3] if len(q16.shape) == 5 else 0
    if t > 1 and (q_per_token is None or q_per_token < 1 or t * q_per_token > n):
        raise err(f"{t} tokens need q_per_token (R) with T * R <= the {n} query rows, got {q_per_token}")
    want = {"q": (q16, (b, kvh, 2, n if n in ROW_TILES else ROW_TILES[0], half), jnp.float16),
            "k_scale": (k_scale, (b, kvh, sq // GROUP, d), jnp.float16),
            "k_min": (k_min, (b, kvh, sq // GROUP, d), jnp.float16),
            "v_upper": (v_upper, (b, kvh, sq // GROUP, half, GROUP), jnp.uint8),
            "v_scale": (v_scale, (b, kvh, sq, 1), jnp.float16), "v_min": (v_min, (b, kvh, sq, 1), jnp.float16),
            "qlen": (qlen, (b, t), jnp.int32)}
    if k_lower is not None:
        want.update(k_lower=(k_lower, k_upper.shape, jnp.uint8), v_lower=(v_lower, v_upper.shape, jnp.uint8))
    if sq % GROUP or k_upper.dtype != jnp.uint8:
        raise err(f"k_upper must be uint8 [B, KVH, S, 64] with S % {GROUP} == 0, got {k_upper.dtype} {k_upper.shape}")
    for name, (x, shape, dtype) in want.items():
        if x.shape != shape or x.dtype != dtype:
            raise err(f"{name} must be {jnp.dtype(dtype).name} {shape}, got {x.dtype} {x.shape}"
                      " (query rows: 16 or 32; values: one statistic per token, head_dim <= G)")
    if buffer is not None:
        buf_k, buf_v, buf_start, positions = buffer
        sb = buf_k.shape[2]
        if (buf_k.dtype not in (jnp.bfloat16, jnp.float16) or buf_v.dtype != buf_k.dtype
                or buf_k.shape != buf_v.shape or buf_k.shape[:2] != (b, kvh) or buf_k.shape[3] != HEAD_DIM
                or sb < TB or sb % 8 or buf_start.shape != (b,) or positions.shape != (b, t)):
            raise err(f"buffer: bf16 / f16 [B, KVH, Sb >= {TB} (a multiple of 8), 128] K and V, buf_start [B], "
                      f"positions [B, T]; got {buf_k.dtype} {buf_k.shape}, {buf_v.dtype} {buf_v.shape}, "
                      f"{buf_start.shape}, {positions.shape}")


def supports_layer(k_upper, k_scale, k_min, v_upper, v_scale, v_min, buf_k, buf_v, group_size: int, *,
                   tokens: int = 1, q_per_token: int = 1, k_lower=None, v_lower=None) -> bool:
    """Whether the kernel takes a hierarchical cache layer's arrays (`HierLayer`) with its buffer
    for `tokens` new tokens of q_per_token query heads per KV head (k_lower / v_lower: the
    target's view): the checks `attention_partials` makes, on the layer's own shapes."""
    b, kvh, _, half = k_upper.shape
    rows = jax.ShapeDtypeStruct((b, tokens), jnp.int32)
    try:
        n = row_tile(tokens * q_per_token)
        check_args(jax.ShapeDtypeStruct((b, kvh, 2, n, half), jnp.float16), k_upper, k_scale, k_min, v_upper,
                   v_scale, v_min, rows, group_size, buffer=(buf_k, buf_v, jax.ShapeDtypeStruct((b,), jnp.int32), rows),
                   k_lower=k_lower, v_lower=v_lower, q_per_token=q_per_token)
    except MosaicAttentionError:
        return False
    return True


def attention_partials(q16, k_upper, k_scale, k_min, v_upper, v_scale, v_min, qlen, *, k_lower=None, v_lower=None,
                       q_per_token: int | None = None, buffer=None, group_size: int = GROUP, num_splits: int = 32,
                       stages: int = 2, l2_prefetch=(), l2_prefetch_bytes: int | None = None,
                       interpret: bool = False):
    """Flash-decoding partials of the attention of T new tokens over the quantized history.

    q16 f16 [B, KVH, 2, N, 64] (`mosaic_query_rows`; N = 16 or 32, column t * R + r the query head
    r of token t); the cache's layer arrays as `HierCache` stores them (k_upper uint8 [B, KVH, S,
    64], k_scale / k_min f16 [B, KVH, S/G, 128], v_upper uint8 [B, KVH, S/G, 64, G], v_scale /
    v_min f16 [B, KVH, S, 1]); k_lower / v_lower: the lower planes (the target's INT8 view; None:
    the draft's 4-bit view); qlen int32 [B, T]: the quantized tokens each new token attends to
    (multiples of G, <= S); q_per_token: R (needed when T > 1). Returns o^T f32 [B, KVH, S', 128,
    N] (unnormalized), m and l f32 [B, KVH, S', N] (log2 domain; m = -1e30, l = 0 for an empty
    split), S' = num_splits rounded up to a power of 2: only the first num_splits are written.

    buffer: optional (buf_k, buf_v, buf_start, positions): the full-precision buffer's part in
    the last program of each (row, KV head), so the history gets num_splits - 1. buf_k / buf_v
    bf16 or f16 [B, KVH, Sb, 128] (Sb a multiple of 8), buf_start int32 [B], positions int32 [B, T]:
    token t sees slots [qlen_t - buf_start, position_t - buf_start]. 64 slots per step, converted
    to f16 in registers (the values loaded transposed) for the same f16 products.

    l2_prefetch: arrays the next kernels read (the decoder passes the o-projection's and gate | up's
    INT4 arrays, `ForwardOptions.l2_prefetch`): the programs prefetch them into the L2 cache (TMA,
    boxes of 256 rows of 256 bytes, box j of an array by program j modulo the programs) after their
    history loop, while the attention still leaves DRAM bandwidth unused. Only whole boxes are
    prefetched, in order, up to l2_prefetch_bytes in all (None: everything); nothing under the
    interpreter. H100, session 12: -36 us of kernel time per 32K draft step at 24 MiB."""
    check_args(q16, k_upper, k_scale, k_min, v_upper, v_scale, v_min, qlen, group_size, buffer, k_lower, v_lower,
               q_per_token)
    if num_splits < 1 or stages < 1 or (buffer is not None and num_splits < 2):
        raise MosaicAttentionError(f"num_splits and stages must be >= 1 (2 with a buffer), got {num_splits}, {stages}")
    buffered, int8 = buffer is not None, k_lower is not None
    shared_buffer = buffered and int8  # the buffer part's tiles in the stage buffers' space (scratch below)
    # the draft sums p per element and reduces across the warps once, after the history: two
    # warpgroup barriers fewer per step (H100: 23.5 -> 21.9 us at 32K, 70.3 -> 64.7 at 128K; the
    # target's view, whose registers are fuller, gains nothing: verify T = 8 41.4 -> 42.4 us at 32K)
    lazy = not int8
    if buffered:
        buf_k, buf_v, buf_start, positions = buffer
        bdt, sb = buf_k.dtype, buf_k.shape[2]
    hs = num_splits - 1 if buffered else num_splits  # programs over the history
    pf = [] if interpret else [(lax.bitcast_convert_type(x, jnp.int8) if x.dtype == jnp.uint8 else x).reshape(
        -1, 256 // x.dtype.itemsize) for x in l2_prefetch if (x.size * x.dtype.itemsize) % 256 == 0]
    pf_boxes, budget = [], (1 << 62) if l2_prefetch_bytes is None else l2_prefetch_bytes
    for x in pf:  # whole boxes of 64 KiB, in order, within the budget
        pf_boxes.append(min(x.shape[0] // 256, budget // (1 << 16)))
        budget -= pf_boxes[-1] << 16
    pf = [x for x, n_ in zip(pf, pf_boxes) if n_]
    pf_boxes = [n_ for n_ in pf_boxes if n_]
    nprog = k_upper.shape[0] * k_upper.shape[1] * num_splits
    b, kvh, sq, half = k_upper.shape
    t = qlen.shape[1]
    nt = sq // GROUP
    g, n, cdt = GROUP, q16.shape[3], jnp.float16
    narr = 6 + 2 * int8  # TMA copies per history step

    def tr(row_bytes, itemsize):  # tiling + swizzle of a shared-memory operand with rows of row_bytes
        return (plgpu.TilingTransform((8, row_bytes // itemsize)), plgpu.SwizzleTransform(row_bytes))

    def body(*refs):
        it = iter(refs)
        sc_g, q_g, ku_g, ks_g, km_g, vu_g, vs_g, vm_g = (next(it) for _ in range(8))
        kl_g, vl_g = (next(it) for _ in range(2)) if int8 else (None,) * 2
        bk_g, bv_g = (next(it) for _ in range(2)) if buffered else (None,) * 2
        pf_g = [next(it) for _ in pf_boxes]
        o_g, m_g, l_g, sc_s, q_s, pv_s, ak_s, av_s, o_s, m_s, l_s, bar = (next(it) for _ in range(12))
        own_buffer = [next(it) for _ in range(3)] if buffered and not shared_buffer else None
        bh, sp = lax.axis_index("bh"), lax.axis_index("sp")
        bi, hi = bh // kvh, bh % kvh
        plgpu.copy_gmem_to_smem(sc_g, sc_s, bar.at[0])
        plgpu.copy_gmem_to_smem(q_g.at[bi, hi], q_s, bar.at[1])

        def scalars():  # (once their copy is waited for) row 0 buf_start, rows 1..T the tokens'
            # prefixes, rows T+1..2T their positions -> qmax, qmin, pmax and (T > 1) per column [N]
            qlens = [sc_s[1 + j, bi] for j in range(t)]
            poss = [sc_s[1 + t + j, bi] for j in range(t)]
            qmax, qmin, pmax = qlens[0], qlens[0], poss[0]
            for j in range(1, t):
                qmax, qmin, pmax = jnp.maximum(qmax, qlens[j]), jnp.minimum(qmin, qlens[j]), jnp.maximum(pmax, poss[j])
            if t == 1:
                return qmax, qmin, pmax, None, None
            tok_of = plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=COL) // q_per_token

            def per_col(vals):
                v = jnp.zeros((n,), jnp.int32)
                for j, x in enumerate(vals):
                    v = jnp.where(tok_of == j, x, v)
                return plgpu.layout_cast(v, COL)
            return qmax, qmin, pmax, per_col(qlens), per_col(poss)
        tok_iota = lambda rows: plgpu.broadcasted_iota(jnp.int32, (rows, n), 0, layout=WGMMA)  # noqa: E731
        bcast = lambda v, rows: lax.broadcast_in_dim(v, (rows, n), [1])  # noqa: E731

        def a_operand(x, stage):  # the interpreter's wgmma takes A from shared memory only
            if not interpret:
                return x
            stage[...] = x
            plgpu.commit_smem()
            return stage

        def product(a, b_, shape):
            def mm(acc_ref):
                plgpu.wgmma(acc_ref, a, b_)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            return plgpu.layout_cast(pl.run_scoped(mm, plgpu.ACC(shape, jnp.float32)), WGMMA)

        def step(grp, tiles, carry, qlen_col):
            ku_s, ks_s, km_s, vu_s, vs_s, vm_s = tiles[:6]
            acc_lo, acc_hi, m, l = carry
            kst = [[plgpu.load(r.at[0, pl.ds(nib * half, half)], layout=COL) for r in (ks_s, km_s)] for nib in range(2)]
            if int8:
                kst = [int8_stats(*st) for st in kst]
            keys = dequant(ku_s[...], tiles[6][...] if int8 else None, *kst, interpret)  # [tokens, 64] each

            def values():
                vst = (plgpu.load(vs_s, layout=COL), plgpu.load(vm_s, layout=COL))  # [tokens]: one per token
                if int8:
                    vst = int8_stats(*vst)
                return dequant(vu_s[0], tiles[7][0] if int8 else None, vst, vst, interpret)  # [64, tokens] each
            vals = None
            if interpret:
                s = sum(product(a_operand(keys[nib], ak_s.at[nib]), q_s.at[nib].T, (g, n)) for nib in range(2))
            else:  # both channel halves into one accumulator
                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, keys[0], q_s.at[0].T)
                    plgpu.wgmma(acc_ref, keys[1], q_s.at[1].T)
                    # the draft's values unpacked while the tensor cores run (H100, with the other two
                    # session-15 changes: 22.5 -> 21.3 us at 32K, 66.9 -> 61.2 at 128K); not the target's
                    # view, whose two planes' registers then spill (verify T = 8 at 128K 123 -> 175 us)
                    v = None if int8 else values()
                    plgpu.wgmma_wait(0)
                    return acc_ref[...], v
                s, vals = pl.run_scoped(scores, plgpu.ACC((g, n), jnp.float32))
                s = plgpu.layout_cast(s, WGMMA)
            if t > 1:  # a token's columns stop at its own prefix (only the last group can differ)
                s = jnp.where(tok_iota(g) < bcast(qlen_col - grp * g, g), s, MASKED)
            m_new = plgpu.layout_cast(jnp.maximum(m, jnp.max(s, axis=0)), COL)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - bcast(m_new, g))
            if lazy:  # the draft: l per element, reduced across the warps once, after the loop
                l = l * bcast(alpha, g) + p
            else:
                l = l * alpha + jnp.sum(p, axis=0)
            pv_s[...] = p.astype(cdt)
            plgpu.commit_smem()
            if vals is None:
                vals = values()
            scale = bcast(alpha, half)
            acc_lo, acc_hi = acc_lo * scale, acc_hi * scale
            if interpret:
                acc_lo = acc_lo + product(a_operand(vals[0], av_s.at[0]), pv_s, (half, n))
                acc_hi = acc_hi + product(a_operand(vals[1], av_s.at[1]), pv_s, (half, n))
            else:  # accumulate in place; run_state waits at its end
                def pv(refs):
                    plgpu.wgmma(refs[0], vals[0], pv_s)
                    plgpu.wgmma(refs[1], vals[1], pv_s)
                acc_lo, acc_hi = pl.run_state(pv)((plgpu.ACC.init(acc_lo), plgpu.ACC.init(acc_hi)))
            return acc_lo, acc_hi, m_new, l

        z = plgpu.layout_cast(jnp.zeros((half, n), jnp.float32), WGMMA)
        l0 = (plgpu.layout_cast(jnp.zeros((g, n), jnp.float32), WGMMA) if lazy
              else plgpu.layout_cast(jnp.zeros((n,), jnp.float32), COL))
        init = (z, z, plgpu.layout_cast(jnp.full((n,), -1e30, jnp.float32), COL), l0)

        def history(*stage):  # the stage buffers, scoped: the buffer part reuses their shared memory
            bufs, bars = list(stage[:-1]), stage[-1]  # ku, ks, km, vu, vs, vm (+ kl, vl); the barriers
            srcs = [r.at[bi, hi] for r in (ku_g, ks_g, km_g)] + [vu_g] + [r.at[bi, hi] for r in (vs_g, vm_g)]
            if int8:
                srcs += [kl_g.at[bi, hi], vl_g]

            def fetch(j, slot):  # the program's j-th group, sp + j * hs, into the stage `slot`
                grp = sp + j * hs
                idx = [pl.ds(grp * g, g), pl.ds(grp, 1), pl.ds(grp, 1), pl.ds(bh * nt + grp, 1), pl.ds(grp * g, g),
                       pl.ds(grp * g, g)] + [pl.ds(grp * g, g), pl.ds(bh * nt + grp, 1)][:2 * int8]
                for src, buf, ix in zip(srcs, bufs, idx):
                    plgpu.copy_gmem_to_smem(src.at[ix], buf.at[slot], bars.at[slot])

            # The groups are dealt round-robin (program sp takes sp, sp + hs, ...), so the first
            # ones are known before the scalars arrive: their copies go out with the scalars' and
            # q's (one memory latency before the first step instead of two). Those of a program
            # with fewer groups than that (a short row) are waited for unused below.
            early = [(sp < hs) & (sp + j * hs < nt) for j in range(stages)]
            for j in range(stages):
                pl.when(early[j])(lambda j=j: fetch(j, j))
            plgpu.barrier_wait(bar.at[0])
            plgpu.barrier_wait(bar.at[1])
            qmax, _, _, qlen_col, _ = scalars()
            steps = jnp.where(sp < hs, jnp.maximum(qmax // g - sp + hs - 1, 0) // hs, 0)

            def loop(i, carry):
                slot = i % stages
                plgpu.barrier_wait(bars.at[slot])
                carry = step(sp + i * hs, [buf.at[slot] for buf in bufs], carry, qlen_col)
                pl.when(i + stages < steps)(lambda: fetch(i + stages, slot))
                return carry

            carry = lax.fori_loop(0, steps, loop, init)
            for j in range(stages):  # (no copy may land in this space after the scope)
                pl.when(early[j] & (j >= steps))(lambda j=j: plgpu.barrier_wait(bars.at[j]))
            if lazy:
                carry = (*carry[:3], plgpu.layout_cast(jnp.sum(carry[3], axis=0), COL))
            return carry

        carry = pl.run_scoped(history, *stage_scratch, collective_axes="wg")
        pid = bh * num_splits + sp
        for ref, boxes in zip(pf_g, pf_boxes):  # box j by program j (mod programs)
            for k in range(-(-boxes // nprog)):
                j = pid + k * nprog
                pl.when(j < boxes)(lambda ref=ref, j=j: plgpu.async_prefetch(ref.at[pl.ds(j * 256, 256)]))

        def buffer_part(carry, kbuf_s, vbuf_s, bbar):  # the last program: the slots any token sees, [lo, end)
            # (read again from shared memory, not carried live through the history loop)
            _, qmin, pmax, qlen_col, pos_col = scalars()
            bst = sc_s[0, bi]
            lo, end = qmin - bst, pmax - bst + 1
            nb = jnp.where(sp == hs, (end - lo + TB - 1) // TB, 0)

            def bloop(i, carry):
                acc_lo, acc_hi, m, l = carry
                t0 = lo + i * TB
                tc = pl.multiple_of(jnp.minimum(t0, sb - TB), 8)  # a last tile past the end starts earlier ...
                for nib in range(2):  # per channel half (the values' A is each half transposed)
                    cols = pl.ds(nib * half, half)
                    plgpu.copy_gmem_to_smem(bk_g.at[bi, hi, pl.ds(tc, TB), cols], kbuf_s.at[nib], bbar.at[2 * nib])
                    plgpu.copy_gmem_to_smem(bv_g.at[bi, hi, pl.ds(tc, TB), cols], vbuf_s.at[nib], bbar.at[2 * nib + 1])
                for j in range(4):
                    plgpu.barrier_wait(bbar.at[j])
                # A in registers in f16 (the buffer's bf16 converted; B = the same f16 query rows)
                keys = [a_operand(plgpu.load(kbuf_s.at[nib], layout=WGMMA).astype(cdt),
                                  ak_s.at[nib, pl.ds(0, TB)] if interpret else None) for nib in range(2)]
                if interpret:
                    s = sum(product(keys[nib], q_s.at[nib].T, (TB, n)) for nib in range(2))
                else:
                    def scores(acc_ref):
                        for nib in range(2):
                            plgpu.wgmma(acc_ref, keys[nib], q_s.at[nib].T)
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]
                    s = plgpu.layout_cast(pl.run_scoped(scores, plgpu.ACC((TB, n), jnp.float32)), WGMMA)
                tok = tok_iota(TB) + tc
                if t > 1:  # ... and masks the slots it repeats; each token its own window
                    vis = (tok >= bcast(jnp.maximum(qlen_col - bst, t0), TB)) & (tok < bcast(pos_col - bst + 1, TB))
                else:
                    vis = (tok >= jnp.maximum(lo, t0)) & (tok < end)
                s = jnp.where(vis, s, MASKED)
                m_new = plgpu.layout_cast(jnp.maximum(m, jnp.max(s, axis=0)), COL)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - bcast(m_new, TB))
                l = l * alpha + jnp.sum(p, axis=0)
                pvb = pv_s.at[pl.ds(0, TB)]
                pvb[...] = p.astype(cdt)
                plgpu.commit_smem()
                vals = [a_operand(plgpu.load(vbuf_s.at[nib].T, layout=WGMMA).astype(cdt),
                                  av_s.at[nib, :, pl.ds(0, TB)] if interpret else None)
                        for nib in range(2)]  # A = V^T: the half's tile loaded transposed
                scale = bcast(alpha, half)
                # (jax 0.11.2: a shared-memory A with this N-major B fails layout inference, and an A
                # made from a transposed load does not lower inside run_state)
                acc_lo = acc_lo * scale + product(vals[0], pvb, (half, n))
                acc_hi = acc_hi * scale + product(vals[1], pvb, (half, n))
                return acc_lo, acc_hi, m_new, l

            return lax.fori_loop(0, nb, bloop, carry)

        if own_buffer:
            carry = buffer_part(carry, *own_buffer)
        elif shared_buffer:  # (every warp past the history's shared-memory reads before TMA refills that space)
            plgpu.commit_smem()
            carry = pl.run_scoped(functools.partial(buffer_part, carry), *buffer_scratch, collective_axes="wg")
        acc_lo, acc_hi, m, l = carry
        o_s[0] = acc_lo
        o_s[1] = acc_hi
        m_s[...] = m
        l_s[...] = l
        plgpu.commit_smem()
        for src, dst in ((o_s, o_g), (m_s, m_g), (l_s, l_g)):
            plgpu.copy_smem_to_gmem(src, dst.at[bi, hi, sp])
        plgpu.wait_smem_to_gmem(0)

    f32, i8 = jnp.float32, jnp.int8
    bpad = max(4, b)  # (a TMA copy moves >= 16 bytes)
    stage_a = [plgpu.SMEM((2, g, half), cdt, transforms=tr(2 * half, 2)),
               plgpu.SMEM((2, half, g), cdt, transforms=tr(128, 2))] if interpret else [
        plgpu.SMEM((1,), f32), plgpu.SMEM((1,), f32)]  # (on the GPU A stays in registers)
    plane_k = plgpu.SMEM((stages, g, half), i8, transforms=tr(half, 1))
    plane_v = plgpu.SMEM((stages, 1, half, g), i8, transforms=tr(g, 1))
    scratch = [plgpu.SMEM((1 + 2 * t, bpad), jnp.int32), plgpu.SMEM((2, n, half), cdt, transforms=tr(2 * half, 2)),
               plgpu.SMEM((g, n), cdt, transforms=tr(2 * n, 2)), *stage_a,
               plgpu.SMEM((2, half, n), f32), plgpu.SMEM((n,), f32), plgpu.SMEM((n,), f32),
               plgpu.Barrier(num_barriers=2)]
    # scoped (pl.run_scoped in the body): the history's stage buffers, then, for the target's view, the
    # buffer part's tiles in the same space. Unshared, the target's view needs ~115 KB at 2 stages, so
    # one program per SM (H100, session 14: verify T = 4 42.3 -> 35.5 us at 32K, 128.5 -> 104.0 at
    # 128K). The draft's fits two per SM either way (~82 KB; registers allow no third) and keeps its
    # buffer tiles apart (no barrier between the parts).
    stage_scratch = [plane_k, plgpu.SMEM((stages, 1, 2 * half), cdt), plgpu.SMEM((stages, 1, 2 * half), cdt), plane_v,
                     plgpu.SMEM((stages, g), cdt), plgpu.SMEM((stages, g), cdt)] + [plane_k, plane_v][:2 * int8] + [
                     plgpu.Barrier(num_arrivals=narr, num_barriers=stages)]
    buffer_scratch = [plgpu.SMEM((2, TB, half), bdt, transforms=tr(128, 2)),
                      plgpu.SMEM((2, TB, half), bdt, transforms=tr(128, 2)),
                      plgpu.Barrier(num_barriers=4)] if buffered else []
    if not shared_buffer:
        scratch += buffer_scratch
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params = InterpretGPUParams()
    s_alloc = 1 << (num_splits - 1).bit_length()  # (a power of 2 for the merge kernel's loads; the
    # slots past num_splits are never written and never read unmasked)
    out = (jax.ShapeDtypeStruct((b, kvh, s_alloc, 2, half, n), f32),
           jax.ShapeDtypeStruct((b, kvh, s_alloc, n), f32), jax.ShapeDtypeStruct((b, kvh, s_alloc, n), f32))
    kernel = plgpu.kernel(
        body, out_type=out, scratch_types=scratch, grid=(b * kvh, num_splits), grid_names=("bh", "sp"),
        num_threads=1, thread_name="wg", interpret=params,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True,
                                             unsafe_no_auto_barriers=True))
    bits = lambda x: lax.bitcast_convert_type(x, i8)  # noqa: E731  (same width: free)
    vblocks = lambda x: bits(x).reshape(b * kvh * nt, half, g)  # noqa: E731  (a TMA window needs <= 5 dims)
    scalars = ([buf_start[:, None], positions] if buffered else [jnp.zeros_like(qlen[:, :1]), qlen])
    scalars = jnp.concatenate([scalars[0], qlen, scalars[1]], axis=1).astype(jnp.int32).T  # [1 + 2T, B]
    scalars = jnp.pad(scalars, ((0, 0), (0, bpad - b)))
    o, m, l = kernel(scalars, q16, bits(k_upper), k_scale, k_min, vblocks(v_upper), v_scale[..., 0], v_min[..., 0],
                     *((bits(k_lower), vblocks(v_lower)) if int8 else ()), *((buf_k, buf_v) if buffered else ()),
                     *pf)
    return o.reshape(b, kvh, s_alloc, 2 * half, n), m, l
