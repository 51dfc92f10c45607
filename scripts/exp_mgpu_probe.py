#!/usr/bin/env python
"""Experiment (GPU only): how fast does jax's own Mosaic GPU mixed-type matmul stream int8 /
int4 weights at decode shapes? Question behind it: would moving our INT4 GEMV from Pallas-Triton
to Mosaic GPU (TMA multi-stage pipeline, wgmma) reach the 2.2 TB/s target by itself?

The weight is the LHS (M = output features, K-major like our layout), x^T a narrow RHS of n
columns (wgmma needs n >= 8; a decode GEMV would use one of them). No group scales: this is an
upper bound for a scaled INT4 kernel built the same way. jax 0.11.2 ships the kernel as an
example admitting int8 only; the probe re-executes its source with int4 admitted too (nothing
of it is part of qspec-jax).

    python3 scripts/exp_mgpu_probe.py        # on the GPU machine; prints one line per config

Result (H100 80GB HBM3, 2026-11-26, docs/benchmarks.md session 4): int8 4096x28672 at 2.40-2.47
TB/s; int4 the same shape at best 32.0 us = 1.84 TB/s (our Triton GEMV: 36.7 us with scales);
shapes with 4096 outputs far slower (64 row tiles for 132 SMs, no split-K).
"""
import functools
import inspect
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler
from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm


def admit_int4():
    src = inspect.getsource(mm.mixed_matmul_kernel).replace(
        "case (jnp.int8, jnp.bfloat16):", "case (jnp.int4, jnp.bfloat16) | (jnp.int8, jnp.bfloat16):")
    ns = dict(mm.__dict__)
    exec(compile(src, mm.__file__, "exec"), ns)
    return ns["mixed_matmul_kernel"]


def run(kernel, n_out, k, n, wdt, cfg):
    a = jax.random.randint(jax.random.key(0), (n_out, k), -8, 7, jnp.int8).astype(wdt)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
    out, ts = profiler.measure(functools.partial(kernel, out_dtype=jnp.bfloat16, config=cfg), iterations=20)(a, b)
    ref = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
    t = statistics.median(ts) * 1e-3
    return t, n_out * k * (1 if wdt == jnp.int8 else 0.5) / t / 1e12, err


def main():
    kernel = admit_int4()
    for wdt in (jnp.int8, jnp.int4):
        for n_out, k in ((28672, 4096), (4096, 14336), (6144, 4096)):
            for tm, tn, tk, st in ((64, 32, 128, 4), (128, 32, 128, 4), (64, 16, 256, 4), (128, 16, 128, 6),
                                   (64, 64, 128, 4)):
                cfg = mm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=st, epi_tile_n=None,
                                      epi_tile_m=64, wg_dimension=mm.MatmulDimension.M)
                head = f"{jnp.dtype(wdt).name} N_out={n_out} K={k} n={tn} tile=({tm},{tn},{tk}) stages={st}"
                try:
                    t, bw, err = run(kernel, n_out, k, tn, wdt, cfg)
                    print(f"{head}: {t * 1e6:.1f} us {bw:.2f} TB/s max rel err {err:.1e}", flush=True)
                except Exception as e:  # record and go on
                    print(f"{head}: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
