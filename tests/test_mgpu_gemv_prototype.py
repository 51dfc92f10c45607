"""The Mosaic GPU INT4 GEMV prototype (`scripts/exp_mgpu_gemv.py`, not used by the decoder) against
`int4_matmul_reference` in Mosaic GPU's interpret mode: both dequantization forms, both weight
layouts, split-K, two groups per step and 64-row programs, so the prototype the next session builds
on keeps working. Its GPU path (inline PTX, A in registers) lowers for sm_90 on the CPU."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import exp_mgpu_gemv as proto  # noqa: E402
from pallas_kernels.int4_matmul import int4_matmul_reference  # noqa: E402


@pytest.mark.parametrize("n,k,split,codes,group_major,per_step,rows", [
    (256, 512, 1, False, False, 1, 128), (256, 512, 2, True, False, 1, 128), (384, 1024, 2, True, True, 2, 128),
    (192, 768, 3, True, True, 1, 64)])
def test_prototype_matches_the_reference(n, k, split, codes, group_major, per_step, rows):
    rng = np.random.default_rng(n + k)
    packed, scale, mn = proto.random_weights(rng, n, k)
    x = jnp.asarray(rng.standard_normal(k), jnp.bfloat16)
    ref = np.asarray(int4_matmul_reference(x[None].astype(jnp.float32), packed, scale, mn, group_size=128)[0])
    got = np.asarray(proto.gemv(x, packed, scale, mn, split_k=split, codes=codes, group_major=group_major,
                                per_step=per_step, rows=rows, interpret=True))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < (1e-4 if codes else 2e-3), err  # f16 dequantized weights in the fma form
    # a wrong group, row block or split would be far off: check a perturbed weight is noticed
    bad = np.asarray(proto.gemv(x, packed.at[0, 0, 0].set(packed[0, 0, 0] ^ 0x77), scale, mn, split_k=split,
                                codes=codes, group_major=group_major, per_step=per_step, rows=rows, interpret=True))
    assert abs(bad[0] - got[0]) > 1e-4 * np.abs(ref).max()


def test_prototype_gpu_lowering_runs_on_the_cpu():
    sds = jax.ShapeDtypeStruct
    n, k = 1024, 1024
    ng = k // 128
    f = lambda xt, p, s, m, a: proto.mgpu_gemv(xt, p, s, m, aux=a, group_major=True, per_step=2)  # noqa: E731
    text = jax.jit(f).trace(sds((ng, 2, 8, 64), jnp.float16), sds((ng, n, 64), jnp.uint8), sds((ng, n), jnp.float16),
                            sds((ng, n), jnp.float16), sds((2, ng), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
