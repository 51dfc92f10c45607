#!/usr/bin/env python
"""A/B of the speculative round (the jitted decode loop) with the buffer shift of session 16 (GPU).

Session 17 found that the flush's `jnp.roll` of the full-precision buffers made XLA copy every
layer's two buffers after the flush's `lax.cond` in every round, flush or not (`HierCache.
_flush_layer` now shifts in place). This script times the round both ways in one process:
"current" (the library as it is) and "roll" (the library's flush with the buffers rolled as before);
"unrolled" has the round's gamma draft steps unrolled (`lax.scan(unroll=True)`) instead of a loop.
Per variant and context: the per-round slope between generations of --tokens and --tokens-long
tokens (their rounds as counted by the loop's stats, so the per-call cost drops out), timed
interleaved over --repeats repetitions after a warm-up, then one profile of the long call (device
kernel time, idle time and the memcpy / memset operations per round: `bench_decode.profile_top`).

  PYTHONPATH=. python3 scripts/ab_round.py --contexts 32768 131072 --repeats 3

Results: a line per variant and context, and JSON in $OUT/ab_round.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
from qspec_jax.hier_cache import HierCache, buffer_start  # noqa: E402
from qspec_jax.model import ForwardOptions, init_random_params  # noqa: E402
from qspec_jax.sampling import GREEDY  # noqa: E402
from qspec_jax.speculative import SpecMethod, _spec_loop  # noqa: E402

_FLUSH = HierCache._flush_layer


def _flush_with_roll(self, lc, old, new, completes):
    """The library's flush, then the buffers rolled as in session 16 (same values in the valid range)."""
    out = _FLUSH(self, lc, old, new, completes)
    g = self.group_size
    shift = (buffer_start(new, g) - buffer_start(old, g))[:, None, None, None] > 0
    return out.replace(buf_k=jnp.where(shift, jnp.roll(lc.buf_k, -g, axis=2), lc.buf_k),
                       buf_v=jnp.where(shift, jnp.roll(lc.buf_v, -g, axis=2), lc.buf_v))


_SCAN = jax.lax.scan

# name -> (flush, scan) used while the variant's loop is traced (None: the library's)
VARIANTS = {"current": (None, None), "roll": (_flush_with_roll, None),
            "unrolled": (None, functools.partial(_SCAN, unroll=True))}  # the draft steps' scan unrolled


@contextlib.contextmanager
def variant(name):
    flush, scan = VARIANTS[name]
    HierCache._flush_layer = flush or _FLUSH
    jax.lax.scan = scan or _SCAN  # (the model's forward has no scan: only the round's draft steps)
    try:
        yield
    finally:
        HierCache._flush_layer, jax.lax.scan = _FLUSH, _SCAN


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(bench_decode.SHAPES), default="llama3-8b")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per short generation")
    ap.add_argument("--tokens-long", type=int, default=64, help="tokens per long generation")
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs of calls per variant (after a warm-up)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    config = bench_decode.SHAPES[args.shape]
    opts = ForwardOptions(backend=args.backend)
    key = jax.random.PRNGKey(0)
    params = init_random_params(config, key, jnp.bfloat16, scale=0.02)
    draft = make_draft(params, DraftRecipe(group_size=128))
    g = args.gamma
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    logits = jax.random.normal(key, (1, config.vocab_size), jnp.float32)
    results = {}
    for ctx in args.contexts:
        spec = CacheSpec(capacity=ctx + 2 * args.tokens_long + 2 * 128 + 16, kind="int8", dtype="bfloat16",
                         group_size=128, spec_room=g + 1)
        cache = bench_decode.random_cache(spec, config, ctx, key)
        fns, rounds = {}, {}
        for name in args.variants:
            for n in (args.tokens, args.tokens_long):
                fn = jax.jit(functools.partial(  # a fresh callable per variant: its own trace
                    _spec_loop, config=config, gamma=g, max_new_tokens=n + 1, method=SpecMethod.quantspec(),
                    cache_spec=spec, sampling=GREEDY, eos_ids=(), opts=opts))
                with variant(name):
                    out = fn(params, draft, cache, logits, key)  # traced and compiled here
                fns[name, n], rounds[name, n] = fn, int(out.stats.rounds[0])
        times = {name: [] for name in args.variants}
        for r in range(args.repeats + 1):
            for name in (args.variants if r % 2 == 0 else args.variants[::-1]):
                call = {}
                for n in (args.tokens, args.tokens_long):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fns[name, n](params, draft, cache, logits, key).tokens)
                    call[n] = time.perf_counter() - t0
                if r:
                    slope = (call[args.tokens_long] - call[args.tokens]) / (
                        rounds[name, args.tokens_long] - rounds[name, args.tokens])
                    times[name].append(slope * 1e3)
        for name in args.variants:
            fn, n_rounds = fns[name, args.tokens_long], rounds[name, args.tokens_long]
            prof = bench_decode.profile_top(lambda fn=fn, c=cache: fn(params, draft, c, logits, key).tokens, n_rounds,
                                            top=8)
            prof.pop("_out")
            med = float(np.median(times[name]))
            results[f"{ctx}/{name}"] = dict(context=ctx, variant=name, round_ms=times[name], median_ms=med,
                                            rounds={str(n): rounds[name, n] for n in (args.tokens, args.tokens_long)},
                                            profile=prof)
            print(f"# ctx {ctx} {name:>8}: round median {med:.4f} ms (all {' '.join(f'{x:.4f}' for x in times[name])});"
                  f" kernels {prof['kernel_ms_per_step']:.4f} ms, {prof['kernels_per_step']:.0f} per round, "
                  f"{prof['copies_per_step']:.1f} memcpy / memset per round ({prof['copy_ms_per_step']:.4f} ms)",
                  flush=True)
        del cache, fns
        if os.environ.get("OUT"):  # after each context (a long run may be cut short)
            with open(os.path.join(os.environ["OUT"], "ab_round.json"), "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, argv=sys.argv[1:], results=results), f, indent=1)


if __name__ == "__main__":
    main()
