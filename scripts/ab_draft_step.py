#!/usr/bin/env python
"""A/B of the draft step under several `ForwardOptions` in one process (GPU).

Builds the Llama-3.1-8B-shaped draft (random weights; `--shape`: bench_decode's shapes) and, per
context, bench_decode's draft-step loop (`draft_steps_fn`, `--steps` steps per call) per variant
over the same random hierarchical cache; the variants' loops are timed interleaved (the order flips every repetition, the first repetition is warm-up), then
each is profiled once (device kernel time, kernel count and the idle time between kernels per step,
with the largest idle gaps by kernel pair: `bench_decode.kernel_gaps`). Per-step medians are the
comparison: two runs of the same code on two machines differ by more than most changes (up to
~5% in session 16), so only an in-process A/B like this one separates them.

  PYTHONPATH=. python3 scripts/ab_draft_step.py --contexts 32768 131072 --repeats 5 \\
      --variant fused "" --variant unfused "fused_projection=False"

A variant is a name and comma-separated ForwardOptions fields (key=value, Python literals).
Results: a line per variant and context, and JSON in $OUT/ab_draft_step.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_decode  # noqa: E402
from qspec_jax.cache_spec import CacheSpec  # noqa: E402
from qspec_jax.draft import DraftRecipe, make_draft  # noqa: E402
from qspec_jax.model import ForwardOptions, init_random_params  # noqa: E402


def parse_options(text: str) -> ForwardOptions:
    fields = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        fields[key.strip()] = ast.literal_eval(value.strip())
    return ForwardOptions(**fields)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(bench_decode.SHAPES), default="llama3-8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--steps", type=int, default=16, help="draft steps per timed call")
    ap.add_argument("--gamma", type=int, default=3, help="positions cycle through gamma slots (bench_decode's loop)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant (after one warm-up)")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OPTIONS"), required=True)
    args = ap.parse_args()
    variants = {name: parse_options(text) for name, text in args.variant}
    config = bench_decode.SHAPES[args.shape]
    key = jax.random.PRNGKey(0)
    draft = make_draft(init_random_params(config, key, jnp.bfloat16, scale=0.02), DraftRecipe(group_size=128))
    n = args.steps
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results = {}
    for ctx in args.contexts:
        spec = CacheSpec(capacity=ctx + 8 * n + 256, kind="int8", dtype="bfloat16", group_size=128, spec_room=4)
        cache = bench_decode.random_cache(spec, config, ctx, key)
        tok = jnp.zeros((1,), jnp.int32)

        fns = {name: bench_decode.draft_steps_fn(config, opts, args.gamma) for name, opts in variants.items()}
        times = {name: [] for name in fns}
        for r in range(args.repeats + 1):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                cache = cache.replace(lengths=jnp.full((1,), ctx, jnp.int32))
                t0 = time.perf_counter()
                cache, tok = fns[name](draft, cache, tok, jnp.int32(n))
                jax.block_until_ready(tok)
                if r:
                    times[name].append((time.perf_counter() - t0) / n * 1e3)
        for name, fn in fns.items():
            cache = cache.replace(lengths=jnp.full((1,), ctx, jnp.int32))
            prof = bench_decode.profile_top(lambda fn=fn, c=cache: fn(draft, c, tok, jnp.int32(n)), n, top=10)
            cache = prof.pop("_out")[0]
            med = float(np.median(times[name]))
            results[f"{ctx}/{name}"] = dict(context=ctx, variant=name, step_ms=times[name], median_ms=med,
                                            profile=prof)
            print(f"# ctx {ctx} {name:>10}: draft step median {med:.4f} ms (all "
                  f"{' '.join(f'{x:.4f}' for x in times[name])}); kernels {prof['kernel_ms_per_step']:.4f} ms, "
                  f"{prof['kernels_per_step']:.0f} per step, {prof['idle_ms_per_step']:.4f} ms idle between them",
                  flush=True)
        del cache, fns
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "ab_draft_step.json"), "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, argv=sys.argv[1:], results=results), f, indent=1)


if __name__ == "__main__":
    main()
