#!/usr/bin/env python
"""GPU check and timing of the Mosaic GPU draft attention (`pallas_kernels/mgpu_draft_attention.py`)
against dequantize-then-attend and against the Triton `hier_attention`, one run on one card.

    PYTHONPATH=. python3 scripts/exp_mgpu_draft_attention.py          # GPU only
    PYTHONPATH=. python3 scripts/exp_mgpu_draft_attention.py --once   # two calls at 32K (for ncu)

Prints: the history kernel's error per row (per-row lengths), `hier_attention(history="mosaic")`
and the Triton path against the reference (history + buffer), then the history kernel's time at
32K / 64K / 128K (and a 32K row in a 128K cache) and the Triton call's at the same contexts.

This script was the session 11 prototype. Its variants (f32 / Mosaic-upcast / inline-PTX bf16
and f16 dequantization, 64-token steps, fused accumulators, stages, splits) and their timings
are in docs/results/mgpu_draft_attention_session11_h100_2026-11-27.txt and docs/benchmarks.md
(session 11); their code is in git history (commit 8ba3225). The kernel that won is the module.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

G = D = 128
H = D // 2
N = 16


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
    from pallas_kernels.mgpu_draft_attention import draft_attention_partials, mosaic_query_rows
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
    k = np.asarray(kv_quant.dequantize_keys(c[0], None, c[1], c[2], G), np.float64)
    v = np.asarray(kv_quant.dequantize_values(kv_quant.values_token_major(c[3]), None, c[4], c[5]), np.float64)
    q = np.asarray(q16.astype(jnp.float32), np.float64).transpose(0, 1, 3, 2, 4).reshape(b, kvh, N, D)
    o, m, l = (np.asarray(a, np.float64) for a in draft_attention_partials(q16, *c, qlen, num_splits=32))
    top = m.max(2, keepdims=True)
    w = np.exp2(m - top)
    got = ((o * w[:, :, :, None, :]).sum(2) / (w * l).sum(2)[:, :, None, :]).transpose(0, 1, 3, 2)
    for bi, n in enumerate(np.asarray(qlen)):
        s_ = np.einsum("hnd,htd->hnt", q[bi], k[bi, :, :n])
        p = np.exp2(s_ - s_.max(-1, keepdims=True))
        ref = np.einsum("hnt,htd->hnd", p / p.sum(-1, keepdims=True), v[bi, :, :n])[:, :4]
        err = np.abs(got[bi, :, :4] - ref).max() / np.abs(ref).max()
        print(f"module check row {bi} (qlen {n}): max rel err {err:.2e}")
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
        fn = jax.jit(lambda *a: draft_attention_partials(*a, num_splits=32))
        _, ts = profiler.measure(fn, iterations=20)(q16, *c, jnp.asarray([n], jnp.int32))
        t = float(np.median(ts)) * 1e3
        mb = 8 * n * (D + 4 + 4 * D / G) / 1e6
        print(f"module capacity {S} row {n}: {t:.2f} us, {mb / t:.3f} TB/s")


def run_once(ctx: int = 32768) -> None:
    """Two calls of the history kernel at ctx on host-made inputs (no other kernels): for ncu and
    MOSAIC_GPU_DUMP_SASS."""
    from pallas_kernels.mgpu_draft_attention import draft_attention_partials
    rng = np.random.default_rng(0)
    u8 = lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    f16 = lambda shape: rng.uniform(0.05, 0.2, shape).astype(np.float16)  # noqa: E731
    c = (u8((1, 8, ctx, H)), f16((1, 8, ctx // G, D)), f16((1, 8, ctx // G, D)), u8((1, 8, ctx // G, H, G)),
         f16((1, 8, ctx, 1)), f16((1, 8, ctx, 1)))
    args = [jax.device_put(x) for x in (rng.standard_normal((1, 8, 2, N, H)).astype(np.float16), *c,
                                        np.asarray([ctx], np.int32))]
    fn = jax.jit(lambda *a: draft_attention_partials(*a, num_splits=32))
    for _ in range(2):
        jax.block_until_ready(fn(*args))


if __name__ == "__main__":
    if sys.argv[1:] == ["--once"]:  # two calls, nothing else
        run_once()
        sys.exit(0)
    check_module()
    for ctx in (32768, 65536, 131072):
        t = time_triton(ctx)
        mb = 8 * ctx * (D + 4 + 4 * D / G) / 1e6
        print(f"triton hier_attention {ctx} (history + buffer + merge): {t:.2f} us, {mb / t:.3f} TB/s")
