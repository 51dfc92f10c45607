#!/usr/bin/env python
"""Experiment: do the building blocks of a Mosaic GPU draft attention lower? (docs/design.md, the
session 10 plan: tokens as wgmma's M, the unpacked codes as its A operand in registers.)

One tile, one warpgroup: TMA copies of a key tile [64 tokens, 128 channels] of int4 (or int8) codes
and of the query rows stored K-major [8, 128] bf16 into shared memory; the codes upcast to bf16 in
registers; scores^T [64, 8] = codes @ q^T by wgmma (A from registers, B the transposed shared-memory
query tile, N = 8); the maximum over the token axis (a reduction across the warpgroup's warps).
Prints the largest error against jnp.

    python3 scripts/exp_mgpu_swap_ab_probe.py [int4] [gpu]     # default: int8, CPU interpret mode

Under interpret mode A goes through shared memory: jax 0.11.2's interpreter runs wgmma on
shared-memory operands only (`pallas/mosaic_gpu/interpret/gpu_callbacks.py`), so the register path
is checked on the GPU alone. Status (2026-11-26): int4 and int8 exact in interpret mode on CPU;
not yet run on the GPU (the session's GPU time was spent).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import numpy as np

TK, D, N = 64, 128, 8  # tokens (wgmma M), channels (K), query rows padded to wgmma's minimum N


def probe(code_dtype, interpret: bool):
    bits = jnp.iinfo(code_dtype).bits
    a_sw = plgpu.find_swizzle(D * bits, "lhs")
    b_sw = plgpu.find_swizzle(D * 16, "rhs")
    a_tr = (plgpu.TilingTransform((8, a_sw * 8 // bits)), plgpu.SwizzleTransform(a_sw))
    b_tr = (plgpu.TilingTransform((8, b_sw // 2)), plgpu.SwizzleTransform(b_sw))

    def body(a_gmem, b_gmem, s_gmem, m_gmem, a_smem, b_smem, s_smem, m_smem, a16_smem, bars):
        plgpu.copy_gmem_to_smem(a_gmem, a_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(b_gmem, b_smem, bars.at[1])
        plgpu.barrier_wait(bars.at[0])
        plgpu.barrier_wait(bars.at[1])
        a = a_smem[...].astype(jnp.bfloat16)
        if interpret:  # the interpreter's wgmma takes A from shared memory only
            a16_smem[...] = a
            plgpu.commit_smem()
            a = a16_smem

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, a, b_smem.T)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((TK, N), jnp.float32))
        s_smem[...] = s
        m_smem[...] = jnp.max(s, axis=0)  # over the tokens: across the warps
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_smem, s_gmem)
        plgpu.copy_smem_to_gmem(m_smem, m_gmem)
        plgpu.wait_smem_to_gmem(0)

    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params = InterpretGPUParams()
    scratch = [plgpu.SMEM((TK, D), code_dtype, transforms=a_tr), plgpu.SMEM((N, D), jnp.bfloat16, transforms=b_tr),
               plgpu.SMEM((TK, N), jnp.float32), plgpu.SMEM((N,), jnp.float32),
               plgpu.SMEM((TK, D), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)),
                                                              plgpu.SwizzleTransform(128))),
               plgpu.Barrier(num_barriers=2)]
    return plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((TK, N), jnp.float32),
                                        jax.ShapeDtypeStruct((N,), jnp.float32)),
                        scratch_types=scratch, num_threads=1, thread_name="wg", interpret=params,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def main():
    code_dtype = jnp.int4 if "int4" in sys.argv else jnp.int8
    interpret = "gpu" not in sys.argv
    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(-8, 8, (TK, D)), code_dtype)  # centered INT4 codes c - 8
    q = jnp.asarray(rng.standard_normal((D, N)), jnp.bfloat16)
    s, m = probe(code_dtype, interpret)(codes, q.T)
    ref = codes.astype(jnp.float32) @ q.astype(jnp.float32)
    print(f"{jnp.dtype(code_dtype).name} {'interpret' if interpret else jax.devices()[0].device_kind}: "
          f"max error scores {float(jnp.max(jnp.abs(s - ref))):.3g}, max {float(jnp.max(jnp.abs(m - ref.max(0)))):.3g}")


if __name__ == "__main__":
    main()
