#!/usr/bin/env python
"""Run each Pallas kernel a few times at the Llama-3.1-8B shapes, for Nsight Compute.

  ncu --kernel-name regex:'int4_matmul|hier_attention' --launch-skip 2 --launch-count 6 \\
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
      python3 scripts/ncu_kernels.py
(the GPU machine has ncu; this machine has no GPU). Calls: INT4 GEMV M=1 on the qkv,
gate/up and down shapes, draft attention (T=1, upper plane) and verify attention (T=5,
INT8) at --context tokens. Each kernel runs `--calls` times (the first call compiles).
--mm-variants / --at-variants: JSON lists of kernel kwargs, each profiled in turn (default [{}]).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_kernels import attn_inputs, random_int4  # noqa: E402
from pallas_kernels.hier_attention import hier_attention  # noqa: E402
from pallas_kernels.int4_matmul import int4_matmul  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--skip-attn", action="store_true")
    ap.add_argument("--skip-mm", action="store_true")
    ap.add_argument("--shapes", default="4096x6144,4096x28672,14336x4096", help="KxN,... for the GEMV")
    ap.add_argument("--mm-variants", default="[{}]")
    ap.add_argument("--at-variants", default="[{}]")
    ap.add_argument("--roles", default="draft,verify")
    args = ap.parse_args()
    key = jax.random.PRNGKey(0)
    for kn in [] if args.skip_mm else args.shapes.split(","):
        k, n = (int(v) for v in kn.split("x"))
        p, s, mn = random_int4(key, k, n, 128)
        x = jax.random.normal(key, (1, k), jnp.bfloat16)
        for kw in json.loads(args.mm_variants):
            for _ in range(args.calls):
                jax.block_until_ready(int4_matmul(x, p, s, mn, group_size=128, **kw))
            print(f"int4_matmul 1x{k}x{n} {kw}: {args.calls} calls", flush=True)
    if args.skip_attn:
        return
    roles = args.roles.split(",")
    for t, lower in [r for r, name in (((1, False), "draft"), ((5, True), "verify")) if name in roles]:
        q, cache, pos, bst, _ = attn_inputs(args.context, t, lower)
        ku, kl, ks, km, vu, vl, vs, vm, bk, bv = cache
        for kw in json.loads(args.at_variants):
            for _ in range(args.calls):
                jax.block_until_ready(hier_attention(q, ku, kl, ks, km, vu, vl, vs, vm, bk, bv, pos, bst,
                                                     group_size=128, use_lower=lower, **kw))
            print(f"hier_attention T={t} use_lower={lower} ctx={args.context} {kw}: {args.calls} calls", flush=True)


if __name__ == "__main__":
    main()
