#!/usr/bin/env python
"""Prototype (not used by the decoder): the draft attention's swap-AB form in Mosaic GPU, the
session 10 plan in docs/design.md, for one row, one KV head and one split.

Per group of G = 128 tokens: the query rows (R = 4 real of N = 16, pre-scaled, log2 domain) times
the group's key scales go to shared memory as wgmma's B ([N, D], passed transposed); the centered
int4 key codes [tokens, D] are A (upcast to bf16), so scores come out [tokens, N]; the softmax
reduces over axis 0 (the tokens, across the warpgroup's warps); p times the per-token value scales
goes to shared memory as the B [tokens, N] of the value product, whose A is the token-minor value
block [D, tokens] as it is stored (upcast). The key minimum terms are one [N] bias per group, the
value minimum terms a running [N] sum added at the end (as in the Triton kernel).

    python3 scripts/exp_mgpu_draft_attention.py [gpu]     # default: CPU interpret mode

Status (2026-11-26): matches dequantize-then-attend in interpret mode (errors ~5e-3, the bf16
operands); not yet compiled for the GPU. Under interpret, A goes through shared memory (the
interpreter's wgmma takes shared-memory operands only) and each value product gets its own
accumulator (`pl.run_state` with `plgpu.ACC.init` has no interpret rule). Missing before it can
replace the Triton kernel: the GPU lowering (layouts of the int4 A operand, the axis-0
reductions), a TMA pipeline over the tiles, the grid over rows / heads / splits, the cache's
unsigned nibble planes (byte ^ 0x88 gives the centered int4; a byte holds channels j and j + D/2,
so q's channels are permuted and the output un-permuted), the full-precision buffer and the merge.
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
N = 16  # query rows (R = 4 real), wgmma N


def make_kernel(S: int, interpret: bool):
    """The kernel for S quantized tokens (a multiple of G): inputs as in `check`; outputs
    acc^T [D, N] (unnormalized, value minimum terms included), m [N], l [N] (log2 domain)."""
    nt = S // G
    i4_tr = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(64))      # int4 rows of 128 codes
    b16_tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))     # bf16 rows of 128
    pv_tr = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))       # bf16 rows of 16

    def body(kc_g, ks_g, kmb_g, vc_g, vs_g, vmb_g, q_g, o_g, m_g, l_g,
             kc_s, ks_s, kmb_s, vc_s, vs_s, vmb_s, q_s, qs_s, pv_s, a16_s, o_s, m_s, l_s, bars):
        for i, (src, dst) in enumerate(((kc_g, kc_s), (ks_g, ks_s), (kmb_g, kmb_s), (vc_g, vc_s), (vs_g, vs_s),
                                         (vmb_g, vmb_s), (q_g, q_s))):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for i in range(7):
            plgpu.barrier_wait(bars.at[i])
        q = q_s[...]  # [N, D] f32, pre-scaled (log2 domain)

        def tile(i, carry):
            acc, m, l, ex = carry
            t0 = i * G
            ks, kmb = ks_s[i], kmb_s[i]  # [D]
            qs_s[...] = (q * lax.broadcast_in_dim(ks, (N, D), [1])).astype(jnp.bfloat16)
            bias = jnp.sum(q * lax.broadcast_in_dim(kmb, (N, D), [1]), axis=1)  # [N]
            plgpu.commit_smem()
            a = kc_s[pl.ds(t0, G), :].astype(jnp.bfloat16)  # [G tokens, D]
            if interpret:  # the interpreter's wgmma takes A from shared memory only
                a16_s[...] = a
                plgpu.commit_smem()
                a = a16_s

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, a, qs_s.T)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            s = pl.run_scoped(scores, plgpu.ACC((G, N), jnp.float32))  # [tokens, rows]
            s = s + lax.broadcast_in_dim(bias, (G, N), [1])
            m_new = jnp.maximum(m, jnp.max(s, axis=0))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (G, N), [1]))
            l = l * alpha + jnp.sum(p, axis=0)
            vs, vmb = vs_s[pl.ds(t0, G)], vmb_s[pl.ds(t0, G)]  # [tokens]
            ex = ex * alpha + jnp.sum(p * lax.broadcast_in_dim(vmb, (G, N), [0]), axis=0)
            pv_s[...] = (p * lax.broadcast_in_dim(vs, (G, N), [0])).astype(jnp.bfloat16)
            plgpu.commit_smem()
            v = vc_s[i].astype(jnp.bfloat16)  # [D, tokens]: the token-minor value block is V^T
            if interpret:
                a16_s[...] = v
                plgpu.commit_smem()
                v = a16_s
            acc = acc * lax.broadcast_in_dim(alpha, (D, N), [1])

            def pv_mm(acc_ref):
                plgpu.wgmma(acc_ref, v, pv_s)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            acc = acc + pl.run_scoped(pv_mm, plgpu.ACC((D, N), jnp.float32))  # (GPU: accumulate in place)
            return acc, m_new, l, ex

        init = (jnp.zeros((D, N), jnp.float32), jnp.full((N,), -1e30, jnp.float32), jnp.zeros((N,), jnp.float32),
                jnp.zeros((N,), jnp.float32))
        acc, m, l, ex = lax.fori_loop(0, nt, tile, init)
        o_s[...] = acc + lax.broadcast_in_dim(ex, (D, N), [1])
        m_s[...] = m
        l_s[...] = l
        plgpu.commit_smem()
        for src, dst in ((o_s, o_g), (m_s, m_g), (l_s, l_g)):
            plgpu.copy_smem_to_gmem(src, dst)
        plgpu.wait_smem_to_gmem(0)

    f32 = jnp.float32
    scratch = [plgpu.SMEM((S, D), jnp.int4, transforms=i4_tr), plgpu.SMEM((nt, D), f32), plgpu.SMEM((nt, D), f32),
               plgpu.SMEM((nt, D, G), jnp.int4, transforms=i4_tr), plgpu.SMEM((S,), f32), plgpu.SMEM((S,), f32),
               plgpu.SMEM((N, D), f32), plgpu.SMEM((N, D), jnp.bfloat16, transforms=b16_tr),
               plgpu.SMEM((G, N), jnp.bfloat16, transforms=pv_tr),
               plgpu.SMEM((G, D), jnp.bfloat16, transforms=b16_tr),
               plgpu.SMEM((D, N), f32), plgpu.SMEM((N,), f32), plgpu.SMEM((N,), f32), plgpu.Barrier(num_barriers=7)]
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params = InterpretGPUParams()
    return plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((D, N), f32), jax.ShapeDtypeStruct((N,), f32),
                                        jax.ShapeDtypeStruct((N,), f32)),
                        scratch_types=scratch, num_threads=1, thread_name="wg", interpret=params,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def check(S: int = 256, interpret: bool = True, seed: int = 0) -> dict:
    """Random centered codes and stats; the kernel against dequantize-then-attend in float64.
    Returns the errors on the 4 real query rows."""
    rng = np.random.default_rng(seed)
    nt = S // G
    kc = rng.integers(-8, 8, (S, D))
    vc = rng.integers(-8, 8, (nt, D, G))
    ks, kmb = rng.uniform(0.05, 0.2, (nt, D)), rng.standard_normal((nt, D)) * 0.3
    vs, vmb = rng.uniform(0.05, 0.2, S), rng.standard_normal(S) * 0.3
    q = np.zeros((N, D))
    q[:4] = rng.standard_normal((4, D)) * 0.3
    f32 = jnp.float32
    out = make_kernel(S, interpret)(jnp.asarray(kc, jnp.int4), jnp.asarray(ks, f32), jnp.asarray(kmb, f32),
                                    jnp.asarray(vc, jnp.int4), jnp.asarray(vs, f32), jnp.asarray(vmb, f32),
                                    jnp.asarray(q, f32))
    o, m, l = (np.asarray(a, np.float64) for a in out)
    k = kc * np.repeat(ks, G, 0) + np.repeat(kmb, G, 0)  # [S, D]
    v = np.concatenate([vc[i].T for i in range(nt)], 0) * vs[:, None] + vmb[:, None]
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
