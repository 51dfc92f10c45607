#!/usr/bin/env python
"""Prototype (not used by the decoder): the draft attention's swap-AB form in Mosaic GPU, the
session 10 plan in docs/design.md, for one row, one KV head and one split.

It reads the cache's own upper planes (`qspec_jax.hier_cache`): keys uint8 [S, D/2] and values in
token-minor blocks uint8 [S/G, D/2, G], a byte holding the codes of channels j (low nibble) and
j + D/2 (high). Per group of G = 128 tokens: the query rows (R = 4 real of N = 16, pre-scaled, log2
domain) times the group's key scales go to shared memory as wgmma's B, one [N, D/2] half per
nibble (passed transposed); the centered key codes c - 8 of each nibble, [tokens, D/2] in bf16, are
A, so two wgmmas give the scores [tokens, N]; the softmax reduces over axis 0 (the tokens, across
the warpgroup's warps); p times the per-token value scales goes to shared memory as the B [tokens,
N] of the value products, whose A are the two nibbles of the value block, [D/2, tokens] each, as it
is stored: the low and high output channels come out as two [D/2, N] accumulators. The minimum
terms are one [N] bias per group for the keys and a running [N] sum for the values (as in the
Triton kernel, whose centered codes these are).

    python3 scripts/exp_mgpu_draft_attention.py [gpu]     # default: CPU interpret mode

Status (2026-11-26): matches dequantize-then-attend in interpret mode (errors ~5e-3, the bf16
operands); not yet compiled for the GPU. Under interpret, A goes through shared memory (the
interpreter's wgmma takes shared-memory operands only) and each value product gets its own
accumulator (`pl.run_state` with `plgpu.ACC.init` has no interpret rule). Missing before it can
replace the Triton kernel: the GPU lowering (the layouts of the unpacked A operands, the axis-0
reductions), a TMA pipeline over the tiles, the grid over rows / heads / splits, the
full-precision buffer and the merge. The nibbles are unpacked by mask, shift and conversion; the
fast int4 -> bf16 upcast (`exp_mgpu_swap_ab_probe.py`) would need a byte to pair two tokens of one
channel instead (byte ^ 0x88 is then the centered int4), a cache format change.
"""
from __future__ import annotations

import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

G = D = 128
H = D // 2  # channels per nibble
N = 16  # query rows (R = 4 real), wgmma N


def _codes(x, high: bool):
    """uint8 tile -> the centered codes c - 8 of one nibble, bf16 (exact)."""
    c = (x >> 4) if high else (x & 0xF)
    return c.astype(jnp.bfloat16) - 8.0


def make_kernel(S: int, interpret: bool):
    """The kernel for S quantized tokens (a multiple of G): inputs as in `check`; outputs
    acc^T [D, N] (unnormalized, value minimum terms included), m [N], l [N] (log2 domain)."""
    nt = S // G

    def tr(row_bytes, itemsize):  # tiling + swizzle for a shared-memory operand with rows of row_bytes
        return (plgpu.TilingTransform((8, row_bytes // itemsize)), plgpu.SwizzleTransform(row_bytes))

    def body(ku_g, ks_g, kmb_g, vu_g, vs_g, vmb_g, q_g, o_g, m_g, l_g,
             ku_s, ks_s, kmb_s, vu_s, vs_s, vmb_s, q_s, qs_s, pv_s, ak_s, av_s, o_s, m_s, l_s, bars):
        for i, (src, dst) in enumerate(((ku_g, ku_s), (ks_g, ks_s), (kmb_g, kmb_s), (vu_g, vu_s), (vs_g, vs_s),
                                         (vmb_g, vmb_s), (q_g, q_s))):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for i in range(7):
            plgpu.barrier_wait(bars.at[i])
        q = q_s[...]  # [N, D] f32, pre-scaled (log2 domain)

        def a_operand(x, stage):  # the interpreter's wgmma takes A from shared memory only
            if not interpret:
                return x
            stage[...] = x
            plgpu.commit_smem()
            return stage

        def product(a, b, shape):
            def mm(acc_ref):
                plgpu.wgmma(acc_ref, a, b)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            return pl.run_scoped(mm, plgpu.ACC(shape, jnp.float32))  # (GPU: accumulate in place)

        def tile(i, carry):
            acc_lo, acc_hi, m, l, ex = carry
            t0 = i * G
            ks, kmb = ks_s[i], kmb_s[i]  # [D]: the group's key scale and minimum + 8 scale
            qs = (q * lax.broadcast_in_dim(ks, (N, D), [1])).astype(jnp.bfloat16)
            qs_s[0] = qs[:, :H]
            qs_s[1] = qs[:, H:]
            bias = jnp.sum(q * lax.broadcast_in_dim(kmb, (N, D), [1]), axis=1)  # [N]
            plgpu.commit_smem()
            kb = ku_s[pl.ds(t0, G), :]  # uint8 [tokens, H]
            s = product(a_operand(_codes(kb, False), ak_s.at[0]), qs_s.at[0].T, (G, N))
            s = s + product(a_operand(_codes(kb, True), ak_s.at[1]), qs_s.at[1].T, (G, N))  # [tokens, rows]
            s = s + lax.broadcast_in_dim(bias, (G, N), [1])
            m_new = jnp.maximum(m, jnp.max(s, axis=0))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (G, N), [1]))
            l = l * alpha + jnp.sum(p, axis=0)
            vs, vmb = vs_s[pl.ds(t0, G)], vmb_s[pl.ds(t0, G)]  # [tokens]
            ex = ex * alpha + jnp.sum(p * lax.broadcast_in_dim(vmb, (G, N), [0]), axis=0)
            pv_s[...] = (p * lax.broadcast_in_dim(vs, (G, N), [0])).astype(jnp.bfloat16)
            plgpu.commit_smem()
            vb = vu_s[i]  # uint8 [H, tokens]: the token-minor value block, V^T of both nibbles
            scale = lax.broadcast_in_dim(alpha, (H, N), [1])
            acc_lo = acc_lo * scale + product(a_operand(_codes(vb, False), av_s.at[0]), pv_s, (H, N))
            acc_hi = acc_hi * scale + product(a_operand(_codes(vb, True), av_s.at[1]), pv_s, (H, N))
            return acc_lo, acc_hi, m_new, l, ex

        z = jnp.zeros((H, N), jnp.float32)
        init = (z, z, jnp.full((N,), -1e30, jnp.float32), jnp.zeros((N,), jnp.float32), jnp.zeros((N,), jnp.float32))
        acc_lo, acc_hi, m, l, ex = lax.fori_loop(0, nt, tile, init)
        exb = lax.broadcast_in_dim(ex, (H, N), [1])
        o_s[0] = acc_lo + exb
        o_s[1] = acc_hi + exb
        m_s[...] = m
        l_s[...] = l
        plgpu.commit_smem()
        for src, dst in ((o_s, o_g), (m_s, m_g), (l_s, l_g)):
            plgpu.copy_smem_to_gmem(src, dst)
        plgpu.wait_smem_to_gmem(0)

    f32, bf16, u8 = jnp.float32, jnp.bfloat16, jnp.uint8
    scratch = [plgpu.SMEM((S, H), u8, transforms=tr(H, 1)), plgpu.SMEM((nt, D), f32), plgpu.SMEM((nt, D), f32),
               plgpu.SMEM((nt, H, G), u8, transforms=tr(G, 1)), plgpu.SMEM((S,), f32), plgpu.SMEM((S,), f32),
               plgpu.SMEM((N, D), f32), plgpu.SMEM((2, N, H), bf16, transforms=tr(2 * H, 2)),
               plgpu.SMEM((G, N), bf16, transforms=tr(2 * N, 2)),
               plgpu.SMEM((2, G, H), bf16, transforms=tr(2 * H, 2)), plgpu.SMEM((2, H, G), bf16, transforms=tr(128, 2)),
               plgpu.SMEM((2, H, N), f32), plgpu.SMEM((N,), f32), plgpu.SMEM((N,), f32), plgpu.Barrier(num_barriers=7)]
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params = InterpretGPUParams()
    return plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((2, H, N), f32), jax.ShapeDtypeStruct((N,), f32),
                                        jax.ShapeDtypeStruct((N,), f32)),
                        scratch_types=scratch, num_threads=1, thread_name="wg", interpret=params,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def check(S: int = 256, interpret: bool = True, seed: int = 0) -> dict:
    """Random unsigned codes packed as the cache packs them, random stats; the kernel against
    dequantize-then-attend in float64. Returns the errors on the 4 real query rows."""
    rng = np.random.default_rng(seed)
    nt = S // G
    kc = rng.integers(0, 16, (S, D))  # codes of token t, channel c
    vc = rng.integers(0, 16, (S, D))
    ks, km = rng.uniform(0.05, 0.2, (nt, D)), rng.standard_normal((nt, D)) * 0.3
    vs, vm = rng.uniform(0.05, 0.2, S), rng.standard_normal(S) * 0.3
    q = np.zeros((N, D))
    q[:4] = rng.standard_normal((4, D)) * 0.3
    ku = (kc[:, :H] | (kc[:, H:] << 4)).astype(np.uint8)  # [S, H]: channel j low, j + H high
    vpk = (vc[:, :H] | (vc[:, H:] << 4)).astype(np.uint8)  # [S, H]
    vu = vpk.reshape(nt, G, H).transpose(0, 2, 1)  # [nt, H, G]: token-minor blocks
    f32 = jnp.float32
    out = make_kernel(S, interpret)(jnp.asarray(ku), jnp.asarray(ks, f32), jnp.asarray(km + 8 * ks, f32),
                                    jnp.asarray(np.ascontiguousarray(vu)), jnp.asarray(vs, f32),
                                    jnp.asarray(vm + 8 * vs, f32), jnp.asarray(q, f32))
    o2, m, l = (np.asarray(a, np.float64) for a in out)
    o = np.concatenate([o2[0], o2[1]], 0)  # [D, N]
    k = kc * np.repeat(ks, G, 0) + np.repeat(km, G, 0)  # [S, D]
    v = vc * vs[:, None] + vm[:, None]
    s = q @ k.T
    mr = s.max(1)
    p = np.exp2(s - mr[:, None])
    lr, orf = p.sum(1), p @ v
    r = slice(0, 4)
    return dict(m_abs=float(np.abs(m[r] - mr[r]).max()), l_rel=float(np.abs(l[r] / lr[r] - 1).max()),
                o_rel=float(np.abs(o.T[r] * (lr[r] / l[r])[:, None] - orf[r]).max() / np.abs(orf[r]).max()))


if __name__ == "__main__":
    interp = "gpu" not in sys.argv
    errs = check(interpret=interp)
    print(("interpret" if interp else jax.devices()[0].device_kind), errs)
    sys.exit(0 if max(errs.values()) < 2e-2 else 1)
