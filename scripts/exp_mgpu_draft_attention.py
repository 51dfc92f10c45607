#!/usr/bin/env python
"""Prototype (not used by the decoder yet): the draft attention's swap-AB form in Mosaic GPU over the
quantized history (the upper planes), the session 10 plan in docs/design.md, grid (row * KV head,
split), one warpgroup per program.

It reads the cache's own upper planes (`qspec_jax.hier_cache`), passed as int8 (a free bitcast):
keys [S, D/2] and values in token-minor blocks [S/G, D/2, G], a byte holding the codes of
channels j (low nibble) and j + D/2 (high), with f16 statistics (keys per group and channel,
values per token). Per step of tt = 128 tokens (TMA, `stages` buffers): each key nibble is
dequantized in registers to [tokens, D/2] (wgmma's A; c * scale + minimum, so no bias terms) and
multiplied by the matching half of the query rows (N = 16, R = 4 real, pre-scaled in the log2
domain; B, in shared memory, transposed); the softmax runs over axis 0 (the tokens: across the
warpgroup's warps); p goes to shared memory as the B [tokens, N] of the value products, whose A
are the two dequantized nibbles of the value block [D/2, tokens] as stored: the low and high
output channels come out as two [D/2, N] accumulators. Outputs per program: acc^T, m, l (log2).

Dequantization forms (`fast`): False: int32 shifts, I2F and an f32 fma; True: Mosaic's int8 ->
bf16 upcast of the masked byte; "asm": inline PTX on two elements per register (prmt under a
bf16 exponent byte, and, sub, fma.rn.bf16x2); "asm16": the same in f16 (f16 operands: 10x more
accurate than bf16, and the f16 statistics need no conversion). Interpret mode emulates the PTX
in jnp (the CPU test covers asm16's arithmetic, not its PTX).

    python3 scripts/exp_mgpu_draft_attention.py                       # CPU, interpret mode
    PYTHONPATH=. python3 scripts/exp_mgpu_draft_attention.py gpu triton   # GPU check + timings

Results (H100, 2026-11-27, docs/results/mgpu_draft_attention_session11_h100_2026-11-27.txt):
asm16 with approx_math and unsafe_no_auto_barriers, 32 splits: 21.8 / 41.4 / 75.6 us at 32K /
64K / 128K (1.63 / 1.72 / 1.89 TB/s); the Triton `hier_attention` in the same run 28.6 / 50.8 /
88.5 us (its buffer part and merge included, ~2-4 us of that). 193 registers per thread: two
programs per SM. Missing before it can replace the Triton kernel: per-row lengths (a dynamic
trip count), the full-precision buffer, the merge of its [2, D/2, N] partials, the upper-plane
statistics of the real cache, and an integration test through the decoder.
"""
from __future__ import annotations

import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.mgpu_draft_attention import unpack_asm  # the production kernel's dequantization

G = D = 128
H = D // 2  # channels per nibble
N = 16  # query rows (R = 4 real), wgmma N


WGMMA = plgpu.Layout.WGMMA
COL = plgpu.Layout.WGMMA.reduce(0)  # a [N] vector broadcast along the token axis of [tokens, N]
ROW = plgpu.Layout.WGMMA.reduce(1)  # a [tokens] vector broadcast along N


def _cdt(fast):
    """The operand dtype of the wgmmas: f16 for asm16, else bf16."""
    return jnp.float16 if fast == "asm16" else jnp.bfloat16


def _dequant(x, high: bool, scale, minimum, fast, interpret: bool = False):
    """int8 tile [rows, cols] (the cache's bytes) -> one nibble's dequantized values
    c * scale + minimum in bf16, the f32 [cols] statistics broadcast along the rows.

    fast: the nibble stays in a byte, as c (low: x & 0xF) or 16 (c - 8) (high: (x & 0xF0) ^ 0x80),
    both exact as signed int8, so Mosaic GPU's int8 -> bf16 register upcast (prmt / and / sub, no
    I2F) applies; the statistics absorb the factor 16 and the offset, and the fma runs in bf16.
    Otherwise: int32 shifts, I2F and an f32 fma, rounded to bf16 once."""
    shape = x.shape
    bc = lambda v: lax.broadcast_in_dim(v, shape, [1])
    if fast in ("asm", "asm16"):
        cdt = _cdt(fast)
        sc, mn = (plgpu.layout_cast(bc(v.astype(cdt)), WGMMA) for v in (scale, minimum))
        if interpret:  # (no inline PTX under interpret: the same arithmetic in jnp)
            x = x.astype(jnp.int32)
            c = (((x >> 4) & 0xF) if high else (x & 0xF)).astype(cdt)
            return plgpu.layout_cast(c * sc + mn, WGMMA)
        return unpack_asm(high, shape, cdt)(plgpu.layout_cast(x, WGMMA), sc, mn)
    if fast:
        if high:
            c = ((x & -16) ^ -128).astype(jnp.bfloat16)  # 16 (c - 8)
            scale, minimum = scale * (1 / 16), minimum + 8 * scale
        else:
            c = (x & 0xF).astype(jnp.bfloat16)
        out = c * bc(scale.astype(jnp.bfloat16)) + bc(minimum.astype(jnp.bfloat16))
    else:
        x = x.astype(jnp.int32)  # (Mosaic GPU has no shifts on 8-bit registers)
        c = (((x >> 4) & 0xF) if high else (x & 0xF)).astype(jnp.float32)
        out = (c * bc(scale) + bc(minimum)).astype(jnp.bfloat16)
    return plgpu.layout_cast(out, WGMMA)


def make_kernel(batch: int, kvh: int, S: int, splits: int, interpret: bool, stages: int = 2, fast: bool = True,
                fused: bool = True, tt: int = G, **compiler_params):
    """Grid (batch * kvh, splits), one warpgroup per program, each over S / splits tokens (whole
    groups) in steps of tt tokens through a TMA pipeline of `stages` buffers (a manual one: the
    interpreter has no rule for emit_pipeline's scoped buffers). Inputs as in `check`; outputs per
    program acc^T [2, H, N] (unnormalized; low and high channel halves), m [N], l [N] (log2)."""
    nt = S // G
    gps = nt // splits  # groups per split
    assert gps * splits == nt and G % tt == 0
    r = G // tt  # token tiles per group (tt: the tokens of one step, wgmma's M)
    cdt = _cdt(fast)
    stat = (lambda v: v) if fast == "asm16" else (lambda v: v.astype(jnp.float32))  # f16 stats used as f16

    def tr(row_bytes, itemsize):  # tiling + swizzle for a shared-memory operand with rows of row_bytes
        return (plgpu.TilingTransform((8, row_bytes // itemsize)), plgpu.SwizzleTransform(row_bytes))

    def body(ku_g, ks_g, km_g, vu_g, vs_g, vm_g, q_g, o_g, m_g, l_g, q_s, pv_s, ak_s, av_s, o_s, m_s, l_s, bar,
             ku_b, ks_b, km_b, vu_b, vs_b, vm_b, bars):
        bh, sp = lax.axis_index("bh"), lax.axis_index("sp")
        b, h = bh // kvh, bh % kvh
        plgpu.copy_gmem_to_smem(q_g.at[b, h], q_s, bar.at[0])
        plgpu.barrier_wait(bar.at[0])

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
            return pl.run_scoped(mm, plgpu.ACC(shape, jnp.float32))

        def step(idx, ku_s, ks_s, km_s, vu_s, vs_s, vm_s, carry):
            acc_lo, acc_hi, m, l = carry
            kb = ku_s[...]  # int8 [tokens, H]
            kst = [tuple(stat(plgpu.load(r.at[0, pl.ds(nib * H, H)], layout=COL)) for r in (ks_s, km_s))
                   for nib in range(2)]
            key = lambda nib: _dequant(kb, bool(nib), *kst[nib], fast, interpret)  # A = the dequantized nibble [tokens, H]
            if fused and not interpret:  # both nibbles' wgmmas into one accumulator, the second A made meanwhile
                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, key(0), q_s.at[0].T)
                    plgpu.wgmma(acc_ref, key(1), q_s.at[1].T)
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]
                s = plgpu.layout_cast(pl.run_scoped(scores, plgpu.ACC((tt, N), jnp.float32)), WGMMA)
            else:
                s = sum(plgpu.layout_cast(product(a_operand(key(nib), ak_s.at[nib]), q_s.at[nib].T, (tt, N)), WGMMA)
                        for nib in range(2))
            m_new = plgpu.layout_cast(jnp.maximum(m, jnp.max(s, axis=0)), COL)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (tt, N), [1]))
            l = l * alpha + jnp.sum(p, axis=0)
            pv_s[...] = p.astype(cdt)
            plgpu.commit_smem()
            vb = vu_s[0]  # int8 [H, tokens]: the token-minor value block, V^T of both nibbles
            vs = stat(plgpu.load(vs_s, layout=COL))  # [tokens]
            vm = stat(plgpu.load(vm_s, layout=COL))
            scale = lax.broadcast_in_dim(alpha, (H, N), [1])
            val = lambda nib: _dequant(vb, bool(nib), vs, vm, fast, interpret)
            acc_lo, acc_hi = acc_lo * scale, acc_hi * scale
            if fused and not interpret:  # accumulate in place; run_state waits at its end
                def pv(refs):
                    plgpu.wgmma(refs[0], val(0), pv_s)
                    plgpu.wgmma(refs[1], val(1), pv_s)
                acc_lo, acc_hi = pl.run_state(pv)((plgpu.ACC.init(acc_lo), plgpu.ACC.init(acc_hi)))
            else:
                acc_lo = acc_lo + product(a_operand(val(0), av_s.at[0]), pv_s, (H, N))
                acc_hi = acc_hi + product(a_operand(val(1), av_s.at[1]), pv_s, (H, N))
            return acc_lo, acc_hi, m_new, l

        g0 = sp * gps
        srcs = [r.at[b, h] for r in (ku_g, ks_g, km_g)] + [vu_g] + [r.at[b, h] for r in (vs_g, vm_g)]
        bufs = (ku_b, ks_b, km_b, vu_b, vs_b, vm_b)

        def fetch(j, slot):  # token tile j's data (group g0 + j // r) into the stage `slot`
            g, t = g0 + j // r, (g0 + j // r) * G + (j % r) * tt
            idx = (pl.ds(t, tt), pl.ds(g, 1), pl.ds(g, 1), (pl.ds(bh * nt + g, 1), slice(None), pl.ds((j % r) * tt, tt)),
                   pl.ds(t, tt), pl.ds(t, tt))
            for src, buf, ix in zip(srcs, bufs, idx):
                plgpu.copy_gmem_to_smem(src.at[ix], buf.at[slot], bars.at[slot])

        for j in range(min(stages, gps * r)):
            fetch(j, j)

        def loop(i, carry):
            slot = i % stages
            plgpu.barrier_wait(bars.at[slot])
            carry = step(i, *(buf.at[slot] for buf in bufs), carry)

            @pl.when(i + stages < gps * r)
            def _():
                fetch(i + stages, slot)
            return carry

        z = plgpu.layout_cast(jnp.zeros((H, N), jnp.float32), WGMMA)
        init = (z, z, plgpu.layout_cast(jnp.full((N,), -1e30, jnp.float32), COL),
                plgpu.layout_cast(jnp.zeros((N,), jnp.float32), COL))
        acc_lo, acc_hi, m, l = lax.fori_loop(0, gps * r, loop, init)
        o_s[0] = acc_lo
        o_s[1] = acc_hi
        m_s[...] = m
        l_s[...] = l
        plgpu.commit_smem()
        for src, dst in ((o_s, o_g), (m_s, m_g), (l_s, l_g)):
            plgpu.copy_smem_to_gmem(src, dst.at[b, h, sp])
        plgpu.wait_smem_to_gmem(0)

    f32, bf16 = jnp.float32, cdt
    scratch = [plgpu.SMEM((2, N, H), bf16, transforms=tr(2 * H, 2)),
               plgpu.SMEM((tt, N), bf16, transforms=tr(2 * N, 2)),
               plgpu.SMEM((2, tt, H), bf16, transforms=tr(2 * H, 2)), plgpu.SMEM((2, H, tt), bf16, transforms=tr(128, 2)),
               plgpu.SMEM((2, H, N), f32), plgpu.SMEM((N,), f32), plgpu.SMEM((N,), f32), plgpu.Barrier(num_barriers=1),
               plgpu.SMEM((stages, tt, H), jnp.int8, transforms=tr(H, 1)), plgpu.SMEM((stages, 1, D), jnp.float16),
               plgpu.SMEM((stages, 1, D), jnp.float16), plgpu.SMEM((stages, 1, H, tt), jnp.int8, transforms=tr(tt, 1)),
               plgpu.SMEM((stages, tt), jnp.float16), plgpu.SMEM((stages, tt), jnp.float16),
               plgpu.Barrier(num_arrivals=6, num_barriers=stages)]
    if not interpret:
        scratch[2:4] = [plgpu.SMEM((1,), f32), plgpu.SMEM((1,), f32)]  # (A stays in registers)
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params = InterpretGPUParams()
    out = (jax.ShapeDtypeStruct((batch, kvh, splits, 2, H, N), f32), jax.ShapeDtypeStruct((batch, kvh, splits, N), f32),
           jax.ShapeDtypeStruct((batch, kvh, splits, N), f32))
    kernel = plgpu.kernel(body, out_type=out, scratch_types=scratch, grid=(batch * kvh, splits), grid_names=("bh", "sp"),
                        num_threads=1, thread_name="wg", interpret=params,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                                             **compiler_params))
    # (the value blocks as [B * KVH * S/G, H, G]: a TMA window of fewer than G tokens needs <= 5 dims)
    return lambda ku, ks, km, vu, vs, vm, q: kernel(ku, ks, km, vu.reshape(-1, H, G), vs, vm, q.astype(cdt))


def make_inputs(rng, batch, kvh, S):
    """Random codes packed as the cache packs them, random f16 stats, q rows (R = 4 real)."""
    nt = S // G
    kc = rng.integers(0, 16, (batch, kvh, S, D))  # codes of token t, channel c
    vc = rng.integers(0, 16, (batch, kvh, S, D))
    ks = rng.uniform(0.05, 0.2, (batch, kvh, nt, D)).astype(np.float16)
    km = (rng.standard_normal((batch, kvh, nt, D)) * 0.3).astype(np.float16)
    vs = rng.uniform(0.05, 0.2, (batch, kvh, S)).astype(np.float16)
    vm = (rng.standard_normal((batch, kvh, S)) * 0.3).astype(np.float16)
    q = np.zeros((batch, kvh, N, D))
    q[:, :, :4] = rng.standard_normal((batch, kvh, 4, D)) * 0.3
    q = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float64)  # the kernel's B operand is bf16
    ku = (kc[..., :H] | (kc[..., H:] << 4)).astype(np.uint8)  # channel j low, j + H high
    vpk = (vc[..., :H] | (vc[..., H:] << 4)).astype(np.uint8)
    vu = np.ascontiguousarray(vpk.reshape(batch, kvh, nt, G, H).transpose(0, 1, 2, 4, 3))  # token-minor blocks
    qh = np.stack([q[..., :H], q[..., H:]], 2)  # [B, KVH, 2, N, H]
    k = kc * np.repeat(ks.astype(np.float64), G, 2) + np.repeat(km.astype(np.float64), G, 2)
    v = vc * vs[..., None].astype(np.float64) + vm[..., None].astype(np.float64)
    args = (ku.view(np.int8), ks, km, vu.view(np.int8), vs, vm, qh.astype(jnp.bfloat16))
    return tuple(jnp.asarray(a) for a in args), (q, k, v)


def check(batch=2, kvh=2, S=512, splits=2, interpret: bool = True, seed: int = 0, fast: bool = True, **cp) -> dict:
    """The kernel (merged over splits here) against dequantize-then-attend in float64. Returns the
    errors on the 4 real query rows."""
    args, (q, k, v) = make_inputs(np.random.default_rng(seed), batch, kvh, S)
    o2, m, l = (np.asarray(a, np.float64) for a in make_kernel(batch, kvh, S, splits, interpret, fast=fast, **cp)(*args))
    o = np.concatenate([o2[:, :, :, 0], o2[:, :, :, 1]], 3)  # [B, KVH, splits, D, N]
    mt = m.max(2, keepdims=True)
    w = np.exp2(m - mt)  # [B, KVH, splits, N]
    out = (o * w[:, :, :, None, :]).sum(2) / (l * w).sum(2)[:, :, None, :]  # [B, KVH, D, N]
    s = np.einsum("bhnd,bhtd->bhnt", q, k)
    p = np.exp2(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhnt,bhtd->bhnd", p / p.sum(-1, keepdims=True), v)
    r = slice(0, 4)
    got = out.transpose(0, 1, 3, 2)[:, :, r]
    return dict(o_rel=float(np.abs(got - ref[:, :, r]).max() / np.abs(ref[:, :, r]).max()),
                m_abs=float(np.abs(mt[:, :, 0, r] - s.max(-1)[:, :, r]).max()))


def time_kernel(batch, kvh, S, splits, stages=2, fast=True, fused=True, **cp) -> float:
    """Median kernel time in microseconds (GPU; cupti through Mosaic GPU's profiler), random data."""
    from jax.experimental.mosaic.gpu import profiler
    nt = S // G
    ks = jax.random.split(jax.random.key(0), 7)
    u8 = lambda k, shape: jax.random.randint(k, shape, -128, 128, jnp.int32).astype(jnp.int8)
    f16 = lambda k, shape: jax.random.uniform(k, shape, jnp.float16, 0.05, 0.2)
    args = (u8(ks[0], (batch, kvh, S, H)), f16(ks[1], (batch, kvh, nt, D)), f16(ks[2], (batch, kvh, nt, D)),
            u8(ks[3], (batch, kvh, nt, H, G)), f16(ks[4], (batch, kvh, S)), f16(ks[5], (batch, kvh, S)),
            jax.random.normal(ks[6], (batch, kvh, 2, N, H), jnp.bfloat16))
    _, ts = profiler.measure(make_kernel(batch, kvh, S, splits, False, stages, fast, fused, **cp), iterations=20)(*args)
    return float(np.median(ts)) * 1e3


def time_triton(ctx: int) -> float:
    """The Triton draft attention (`hier_attention`, upper plane, T = 1, its merge and buffer part
    included) on bench_kernels' random cache of the same shape: microseconds of all its kernels."""
    from jax.experimental.mosaic.gpu import profiler
    sys.path.insert(0, "scripts")
    from bench_kernels import attn_inputs
    from pallas_kernels.hier_attention import hier_attention
    q, cache, pos, bst, _ = attn_inputs(ctx, 1, False)
    fn = jax.jit(lambda *c: hier_attention(q, *c, pos, bst, group_size=G, use_lower=False))
    _, ts = profiler.measure(fn, iterations=20)(*cache)
    return float(np.median(ts)) * 1e3


def check_module(seed: int = 0) -> None:
    """GPU: pallas_kernels.mgpu_draft_attention (per-row lengths, the cache's own arrays) against
    dequantize-then-attend, then its time at 32K / 64K / 128K (full rows) and 128K capacity with
    a 32K row."""
    from jax.experimental.mosaic.gpu import profiler
    from pallas_kernels.mgpu_draft_attention import draft_history_partials, mosaic_query_rows
    from qspec_jax import kv_quant
    rng = np.random.default_rng(seed)
    b, kvh, sq = 2, 8, 8192

    def cache(sq, rng):
        u8 = lambda shape: jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)  # noqa: E731
        f16 = lambda lo, hi, shape: jnp.asarray(rng.uniform(lo, hi, shape), jnp.float16)  # noqa: E731
        return (u8((b, kvh, sq, H)), f16(0.05, 0.2, (b, kvh, sq // G, D)), f16(-0.6, 0.6, (b, kvh, sq // G, D)),
                u8((b, kvh, sq // G, H, G)), f16(0.05, 0.2, (b, kvh, sq, 1)), f16(-0.6, 0.6, (b, kvh, sq, 1)))
    c = cache(sq, rng)
    qlen = jnp.asarray([sq, 3 * G], jnp.int32)
    q16 = mosaic_query_rows(jnp.asarray(rng.standard_normal((b, kvh, 4, D)) * 0.3, jnp.float32))
    o, m, l = (np.asarray(a, np.float64) for a in draft_history_partials(q16, *c, qlen, num_splits=32))
    top = m.max(2, keepdims=True)
    w = np.exp2(m - top)
    got = ((o * w[:, :, :, None, :]).sum(2) / (w * l).sum(2)[:, :, None, :]).transpose(0, 1, 3, 2)
    k = np.asarray(kv_quant.dequantize_keys(c[0], None, c[1], c[2], G), np.float64)
    v = np.asarray(kv_quant.dequantize_values(kv_quant.values_token_major(c[3]), None, c[4], c[5]), np.float64)
    q = np.asarray(q16.astype(jnp.float32), np.float64).transpose(0, 1, 3, 2, 4).reshape(b, kvh, N, D)
    for bi, n in enumerate(np.asarray(qlen)):
        s_ = np.einsum("hnd,htd->hnt", q[bi], k[bi, :, :n])
        p = np.exp2(s_ - s_.max(-1, keepdims=True))
        ref = np.einsum("hnt,htd->hnd", p / p.sum(-1, keepdims=True), v[bi, :, :n])[:, :4]
        print(f"module check row {bi} (qlen {n}): max rel err {np.abs(got[bi, :, :4] - ref).max() / np.abs(ref).max():.2e}")
    # hier_attention(history="mosaic"): history and buffer in the Mosaic kernel, one merge
    from pallas_kernels.hier_attention import hier_attention, hier_attention_reference
    sys.path.insert(0, "scripts")
    from bench_kernels import quantized_case
    for lens in ([8000], [8190, 300], [255, 4100]):
        args = quantized_case(np.random.default_rng(len(lens)), len(lens), 1, 8, 4, D, G, 8192, 272, lens,
                              jnp.bfloat16)
        ref = np.asarray(hier_attention_reference(*[a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a
                                                    for a in args], group_size=G, use_lower=False), np.float64)
        for hist in ("triton", "mosaic"):
            got = np.asarray(hier_attention(*args, group_size=G, use_lower=False, history=hist), np.float64)
            print(f"hier_attention history={hist} lens={lens}: max rel err {np.abs(got - ref).max() / np.abs(ref).max():.2e}")
    for S, n in ((32768, 32768), (65536, 65536), (131072, 131072), (131072, 32768)):
        ks = jax.random.split(jax.random.key(S + n), 7)
        u8 = lambda k_, shape: jax.random.bits(k_, shape, jnp.uint8)  # noqa: E731
        f16 = lambda k_, shape: jax.random.uniform(k_, shape, jnp.float16, 0.05, 0.2)  # noqa: E731
        c = (u8(ks[0], (1, 8, S, H)), f16(ks[1], (1, 8, S // G, D)), f16(ks[2], (1, 8, S // G, D)),
             u8(ks[3], (1, 8, S // G, H, G)), f16(ks[4], (1, 8, S, 1)), f16(ks[5], (1, 8, S, 1)))
        q16 = jax.random.normal(ks[6], (1, 8, 2, N, H), jnp.float16)
        fn = jax.jit(lambda *a: draft_history_partials(*a, num_splits=32))
        _, ts = profiler.measure(fn, iterations=20)(q16, *c, jnp.asarray([n], jnp.int32))
        t = float(np.median(ts)) * 1e3
        mb = 8 * n * (D + 4 + 4 * D / G) / 1e6
        print(f"module capacity {S} row {n}: {t:.2f} us, {mb / t:.3f} TB/s")


if __name__ == "__main__":
    interp = "gpu" not in sys.argv
    if "module" in sys.argv:
        check_module()
        sys.exit(0)
    ok = True
    cps = [{}, dict(tt=64)] if interp else [dict(approx_math=True, unsafe_no_auto_barriers=True)]
    for fast in ("asm", "asm16", False):
        for cp in cps:
            errs = check(interpret=interp, fast=fast, **cp)
            ok &= errs["o_rel"] < 1e-2 and errs["m_abs"] < 5e-2  # (m: the keys are rounded to bf16)
            print("interpret" if interp else jax.devices()[0].device_kind, f"fast={fast}", cp, errs)
    if "dump" in sys.argv:  # one compile per variant (run with MOSAIC_GPU_DUMP_SASS / _PTXAS / _TO set)
        for fast, fused in ((True, True), (False, False)):
            print("dump", fast, fused, time_kernel(1, 8, 32768, 32, 2, fast, fused))
    elif not interp:
        variants = [dict(fast=f, fused=True, approx_math=True, unsafe_no_auto_barriers=True) for f in ("asm16",)]
        for S, splits in ((32768, 32), (65536, 32), (131072, 32)):
            for v in variants:
                name = " ".join(f"{k}={x}" for k, x in v.items())
                try:
                    t = time_kernel(1, 8, S, splits, 2, **v)
                except Exception as e:  # noqa: BLE001  (an experiment: report and go on)
                    print(f"S={S} splits={splits} {name}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                mb = 8 * S * (D + 4 + 4 * D / G) / 1e6
                print(f"S={S} splits={splits} {name}: {t:.2f} us, {mb / t:.3f} TB/s")
            if "triton" in sys.argv:
                t = time_triton(S)
                print(f"S={S} triton hier_attention (with merge + buffer): {t:.2f} us, {mb / t:.3f} TB/s")
    sys.exit(0 if ok else 1)
