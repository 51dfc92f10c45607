#!/usr/bin/env python
"""Experiment (GPU only): how fast can the INT4 GEMV's bytes be *read* at all?

For each draft GEMV shape (M = 1), three kernels read the same K-major weight words
([N, K/G, G/8] uint32, what `int4_matmul` streams) and do almost nothing with them:
  xla      XLA's reduction of all the words (its own grid; the floor any kernel could reach)
  stream   a Pallas-Triton kernel with the GEMV's grid and tiles (block_n columns per program,
           groups_per_step groups per loop step) that only adds the words up
  stream3  the same with num_stages=3
Set against the GEMV's device time (same run), the gap between `stream` and the GEMV is the
cost of the GEMV's arithmetic; the gap between `xla` and `stream` is the cost of the program
structure (grid, loop steps, loads Triton does not pipeline).

    PYTHONPATH=. python3 scripts/exp_read_floor.py      # on the GPU machine; prints a table
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

import bench_kernels as bk  # noqa: E402
from pallas_kernels.int4_matmul import int4_matmul  # noqa: E402

G = 128
# name, K, N, block_n, groups per step (the GEMV's M = 1 defaults)
SHAPES = [("qkv", 4096, 6144, 16, 16), ("o", 4096, 4096, 8, 16), ("gate/up", 4096, 28672, 16, 16),
          ("down", 14336, 4096, 8, 16)]


def _stream_kernel(w_ref, o_ref, *, steps, gps, block_n):
    n0 = pl.program_id(0) * block_n

    def body(i, acc):
        t = w_ref[pl.ds(n0, block_n), pl.ds(i * gps, gps), :]  # [block_n, gps, G/8] uint32
        return acc + jnp.sum(jnp.sum(t, axis=2), axis=1)

    o_ref[pl.ds(n0, block_n)] = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_n,), jnp.uint32))


@functools.partial(jax.jit, static_argnames=("block_n", "gps", "stages"))
def stream(w, *, block_n, gps, stages):
    n, ng, _ = w.shape
    return pl.pallas_call(
        functools.partial(_stream_kernel, steps=ng // gps, gps=gps, block_n=block_n),
        grid=(n // block_n,), out_shape=jax.ShapeDtypeStruct((n,), jnp.uint32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=stages), name="stream")(w)


def main():
    bk.PROFILE = True
    print(f"# {jax.devices()[0].device_kind}")
    print("| shape | MB of words | xla reduce | stream (1 stage) | stream (3 stages) | int4 GEMV | GEMV TB/s | GEMV, prefetch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, n, block_n, gps in SHAPES:
        key = jax.random.PRNGKey(0)
        w = jax.random.bits(key, (n, k // G, G // 8), jnp.uint32)
        packed, scale, minimum = bk.random_int4(key, k, n, G)
        x = jax.random.normal(key, (1, k), jnp.float32).astype(jnp.bfloat16)
        copies = max(4, -(-150_000_000 // (w.size * 4)))  # > 3x the 50 MB L2: no set is still cached
        sets = bk.copies_of((w,), copies)
        t = {}
        t["xla"] = bk.time_calls(lambda a: jnp.sum(a, dtype=jnp.uint32), sets, reps=20)["kernel_s"]
        t["s1"] = bk.time_calls(lambda a: stream(a, block_n=block_n, gps=gps, stages=1), sets, reps=20)["kernel_s"]
        t["s3"] = bk.time_calls(lambda a: stream(a, block_n=block_n, gps=gps, stages=3), sets, reps=20)["kernel_s"]
        msets = bk.copies_of((x, packed, scale, minimum), copies)
        t["mm"] = bk.time_calls(lambda xx, p, s, m: int4_matmul(xx, p, s, m, group_size=G), msets,
                                reps=20)["kernel_s"]
        t["mmp"] = bk.time_calls(lambda xx, p, s, m: int4_matmul(xx, p, s, m, group_size=G, prefetch=True), msets,
                                 reps=20)["kernel_s"]
        nbytes = w.size * 4
        mm_bytes = packed.size + 2 * scale.size * 2
        print(f"| {name} {k}x{n} | {nbytes / 1e6:.1f} | {t['xla'] * 1e6:.1f} us | {t['s1'] * 1e6:.1f} us | "
              f"{t['s3'] * 1e6:.1f} us | {t['mm'] * 1e6:.1f} us | {mm_bytes / t['mm'] / 1e12:.2f} | {t['mmp'] * 1e6:.1f} us |", flush=True)


if __name__ == "__main__":
    main()
