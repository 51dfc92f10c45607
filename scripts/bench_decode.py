#!/usr/bin/env python
"""Decode-step benchmarks: the autoregressive baseline and QuantSpec's pieces.

Random weights at a named shape (default Llama-3.1-8B), batch 1. For each context:
  ar      autoregressive step, fp (bf16) KV cache: the baseline every speedup is against
  draft   one QuantSpec draft step (INT4 weights, upper-plane KV + buffer)
  verify  one target pass over gamma+1 tokens (bf16 weights, INT8 KV + buffer)
  round   gamma draft steps + verify + accept + commit (one iteration of the real loop)
  stream  one StreamingLLM draft step (bf16 weights, window of context/4)
  flush   a round's commit when a KV group completes (quantize G tokens into the planes, shift
          the buffer: `HierCache.commit`'s lax.cond branch) against one that completes none; the
          difference is the flush, paid once per G committed tokens
plus the prefill time of a prompt of the largest context, a device-copy ceiling measured in
the same run, bytes each step must read and achieved bandwidth. Kernel counts:
scripts/dump_decode_hlo.py.

  python scripts/bench_decode.py --shape llama3-8b --contexts 32768 131072 --parts ar
  python scripts/bench_decode.py --shape smollm2 --contexts 4096 8192 --parts ar
Writes JSON to $OUT/bench_decode.json (if $OUT is set) and --json PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qspec_jax.cache_spec import CacheSpec  # noqa: E402
from qspec_jax.config import LlamaConfig, RopeScaling  # noqa: E402
from qspec_jax.draft import DraftRecipe, make_draft  # noqa: E402
from qspec_jax.generate import prefill_cache  # noqa: E402
from qspec_jax.model import ForwardOptions, forward, init_random_params, lm_logits, param_bytes  # noqa: E402
from qspec_jax.sampling import GREEDY  # noqa: E402
from qspec_jax.speculative import SpecMethod  # noqa: E402

SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                             rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                             max_position_embeddings=262144 + 1024),
    "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                           tie_word_embeddings=True, max_position_embeddings=8192 + 1024),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, max_position_embeddings=8192),
}


def timed(fn, *args, repeats=5):
    """Median seconds of fn(*args) after a warm-up call (blocks on the result)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_ceiling(nbytes=2 << 30):
    """Device copy bandwidth, bytes read + written per second."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)  # elementwise: one read, one write
    return 2 * nbytes / timed(f, x, repeats=10)


def random_cache(spec: CacheSpec, config, context, key):
    """A cache filled with random content and `context` committed tokens per row."""
    cache = spec.init(config, 1)

    def fill(x):
        if x.dtype == jnp.uint8:
            return jax.random.randint(key, x.shape, 0, 256, jnp.int32).astype(jnp.uint8)
        if x.dtype == jnp.int32:
            return x
        return (0.5 * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)

    cache = jax.tree_util.tree_map(fill, cache)
    return cache.replace(lengths=jnp.full((1,), context, jnp.int32))


def loop_time(compiled, args, n, *inputs):
    """Median per-iteration seconds of a compiled n-iteration loop (first call = warm-up)."""
    ts = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        ts.append((time.perf_counter() - t) / n)
    return float(np.median(ts[1:]))


def per_step(run, n_short: int, n_long: int, repeats: int):
    """Seconds per step from run(k) (seconds of one call of k steps), median of `repeats` calls after
    a warm-up. n_long = 0: per call / n_short, and None. Else the slope between n_short and n_long
    steps, which leaves out what a call costs whatever its length (dispatching ~800 buffers: ~0.1 ms
    of a draft step at 16 steps per call, H100, session 16), and the per-call figure at n_short."""
    def median_call(k):
        ts = [run(k) for _ in range(repeats + 1)]
        return float(np.median(ts[1:]))
    t_short = median_call(n_short)
    if not n_long:
        return t_short / n_short, None
    t_long = median_call(n_long)
    return (t_long - t_short) / (n_long - n_short), t_short / n_short


def report(res: dict, name: str, seconds: float, per_call, label):
    """Print a part's time (label None: no line) and keep the per-call figure beside the slope."""
    if per_call is not None:
        res[f"{name}_ms_per_call_avg"] = 1e3 * per_call
    if label:
        extra = "" if per_call is None else f" (slope; {1e3 * per_call:.3f} ms as per-call average)"
        print(f"{label} {1e3 * seconds:.3f} ms{extra}", flush=True)


def draft_steps_fn(config, opts, gamma: int):
    """The timed draft-step loop (also `scripts/ab_draft_step.py`'s): jitted (draft params, cache,
    token [B], steps) -> (cache, token), the cache donated; the steps' positions cycle through gamma
    slots past the committed length, as a round's draft steps do, and each feeds its argmax on."""
    from qspec_jax.hier_cache import DRAFT

    @functools.partial(jax.jit, donate_argnums=(1,))
    def draft_steps(p, cache, tok, steps):
        def body(i, c):
            cache, tok = c
            pos = cache.lengths[:, None] + i % gamma
            h, cache = forward(p, config, tok[:, None], pos, cache, view=DRAFT, opts=opts.for_draft())
            return cache, jnp.argmax(lm_logits(p, h[:, 0], opts), -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, tok))
    return draft_steps


def spec_parts(args, config, params, draft, contexts, cap, key, opts, n, g):
    """Per context: draft step, verify pass, full round (QuantSpec), StreamingLLM draft step."""
    from qspec_jax.hier_cache import TARGET
    from qspec_jax.kv_cache import StreamingView
    from qspec_jax.speculative import speculative_from_prefill

    outs = [{} for _ in contexts]
    room = max([g] + list(args.verify_gammas or [])) + 1
    room = max(room, opts.fixed_rows)
    spec = CacheSpec(capacity=cap, kind="int8", dtype="bfloat16", group_size=args.kv_group, spec_room=room)
    cache = random_cache(spec, config, contexts[0], key)
    tok = jnp.zeros((1,), jnp.int32)

    def at(c, context):
        return c.replace(lengths=jnp.full((1,), context, jnp.int32))

    def chained(fn, n_iter, p, cache, x, context):
        """Seconds per iteration of fn(p, cache, x, n_iter) -> (cache, x) (cache donated and chained):
        per call / n_iter, or with --steps-long the slope between n_iter and that many iterations
        (`per_step`). Returns (seconds, the per-call figure or None, cache)."""
        def run(k):
            nonlocal cache, x
            cache = at(cache, context)
            t = time.perf_counter()
            cache, x = fn(p, cache, x, jnp.int32(k))
            jax.block_until_ready(x)
            return time.perf_counter() - t
        t, per_call = per_step(run, n_iter, args.steps_long, args.repeats)
        return t, per_call, cache

    if "draft" in args.parts:
        draft_steps = draft_steps_fn(config, opts, g)
        for o, c in zip(outs, contexts):
            t, per_call, cache = chained(draft_steps, n, draft, cache, tok, c)
            o["draft_ms"] = 1e3 * t
            report(o, "draft", t, per_call, f"# ctx {c}: draft")
            if args.profile:  # kernels per draft step, by name (--hlo-dir maps fusion names to ops)
                cache = at(cache, c)
                prof = profile_top(lambda c_=cache: draft_steps(draft, c_, tok, jnp.int32(n)), n,
                                   top=args.profile_top)
                cache = prof.pop("_out")[0]
                o["draft_profile"] = prof
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            text = draft_steps.lower(draft, cache, tok, jnp.int32(n)).compile().as_text()
            with open(os.path.join(args.hlo_dir, f"draft_steps_{args.shape}.hlo.txt"), "w") as f:
                f.write(text)
    if "verify" in args.parts:
        for gv in sorted(set(args.verify_gammas or []) | {g}):
            feed = jnp.zeros((1, gv + 1), jnp.int32)

            @functools.partial(jax.jit, donate_argnums=(1,))
            def verify_steps(p, cache, feed, steps):
                def body(i, c):
                    cache, feed = c
                    pos = cache.lengths[:, None] + jnp.arange(feed.shape[1])
                    h, cache = forward(p, config, feed, pos, cache, view=TARGET, opts=opts)
                    # a data dependency XLA cannot fold away (argmax < vocab, so this adds 0)
                    return cache, feed + jnp.argmax(lm_logits(p, h, opts), -1).astype(jnp.int32) // config.vocab_size
                return jax.lax.fori_loop(0, steps, body, (cache, feed))
            for o, c in zip(outs, contexts):
                t, per_call, cache = chained(verify_steps, n, params, cache, feed, c)
                o.setdefault("verify_ms_by_gamma", {})[str(gv)] = 1e3 * t
                if gv == g:
                    o["verify_ms"] = 1e3 * t
                report(o, f"verify_g{gv}", t, per_call, f"# ctx {c}: verify gamma {gv} ({gv + 1} tokens)")
    if "round" in args.parts:
        logits = jax.random.normal(key, (1, config.vocab_size), jnp.float32)

        def rounds_fn_for(tokens):
            return functools.partial(speculative_from_prefill, config=config, gamma=g, max_new_tokens=tokens,
                                     method=SpecMethod.quantspec(), cache_spec=spec, sampling=GREEDY, eos_ids=(),
                                     opts=opts)
        rounds_fn = rounds_fn_for(n + 1)
        rounds_tokens = jax.jit(lambda *a: rounds_fn(*a).tokens)  # one call of several rounds
        for o, c in zip(outs, contexts):
            res = rounds_fn(params, draft, at(cache, c), logits, key)
            rounds = int(res.stats.rounds[0])
            t_call = loop_time(lambda *a: rounds_fn(*a).tokens, args, rounds, params, draft, at(cache, c), logits,
                               key)
            o["round_ms"], per_call = 1e3 * t_call, None
            if args.steps_long:  # the slope between two generation lengths (their rounds as counted)
                long_fn = rounds_fn_for(args.steps_long + 1)
                res_l = long_fn(params, draft, at(cache, c), logits, key)
                rounds_l = int(res_l.stats.rounds[0])
                t_l = loop_time(lambda *a: long_fn(*a).tokens, args, rounds_l, params, draft, at(cache, c), logits,
                                key)
                per_call = t_call
                o["round_ms"] = 1e3 * (t_l * rounds_l - t_call * rounds) / max(rounds_l - rounds, 1)
            o["round_acceptance_random_weights"] = res.stats.summary(g)["acceptance_rate"]
            report(o, "round", o["round_ms"] / 1e3, per_call, f"# ctx {c}: round")
            if args.profile:  # kernels per round: one jitted call of `rounds` rounds under the profiler
                jax.block_until_ready(rounds_tokens(params, draft, at(cache, c), logits, key))  # compile outside
                prof = profile_top(lambda c_=at(cache, c): rounds_tokens(params, draft, c_, logits, key), rounds,
                                   top=args.profile_top)
                prof.pop("_out")
                o["round_profile"] = prof
        if args.hlo_dir:  # the compiled round loop (fusion names of the round profile)
            os.makedirs(args.hlo_dir, exist_ok=True)
            text = rounds_tokens.lower(params, draft, at(cache, contexts[0]), logits, key).compile().as_text()
            with open(os.path.join(args.hlo_dir, f"rounds_{args.shape}.hlo.txt"), "w") as fh:
                fh.write(text)
    if "flush" in args.parts:
        gk = args.kv_group
        for o, c in zip(outs, contexts):
            base = c - c % gk + gk  # a group boundary
            by = {}
            for name, start in (("flush", base - 2), ("no_flush", base)):  # commit start -> start + 4

                @functools.partial(jax.jit, donate_argnums=(1,))
                def commits(_, cache, x, steps, start=start):
                    def body(i, cc):
                        cache, x = cc
                        lens = jnp.full_like(cache.lengths, start) + x  # (x = 0: a dependency XLA keeps)
                        cache = cache.replace(lengths=lens).commit(lens + 4)
                        return cache, x + cache.lengths[0] // (1 << 30)
                    return jax.lax.fori_loop(0, steps, body, (cache, x))

                by[name], per_call, cache = chained(commits, n, None, cache, jnp.int32(0), c)
                report(o, name, by[name], per_call, None)
            o["flush_ms"] = 1e3 * (by["flush"] - by["no_flush"])
            o["commit_no_flush_ms"] = 1e3 * by["no_flush"]
            print(f"# ctx {c}: flush {o['flush_ms']:.3f} ms per flush (commit with a completing group "
                  f"{1e3 * by['flush']:.3f} ms, without {1e3 * by['no_flush']:.3f}); once per {gk} tokens", flush=True)
    del cache
    if "stream" in args.parts:
        fp = CacheSpec(capacity=cap, kind="fp", dtype="bfloat16", spec_room=g + 1)
        fcache = random_cache(fp, config, contexts[0], key)
        for o, c in zip(outs, contexts):
            view = StreamingView(sink=4, window=max(64, c // 4))

            @functools.partial(jax.jit, donate_argnums=(1,))
            def stream_steps(p, cache, tok, steps):
                def body(i, cc):
                    cache, tok = cc
                    pos = cache.lengths[:, None] + i % g
                    h, cache = forward(p, config, tok[:, None], pos, cache, view=view, opts=opts)
                    return cache, jnp.argmax(lm_logits(p, h[:, 0], opts), -1).astype(jnp.int32)
                return jax.lax.fori_loop(0, steps, body, (cache, tok))
            t, per_call, fcache = chained(stream_steps, n, params, fcache, tok, c)
            o["stream_draft_ms"] = 1e3 * t
            report(o, "stream_draft", t, per_call, f"# ctx {c}: stream draft")
    for o, c in zip(outs, contexts):
        print(f"# ctx {c}: " + ", ".join(f"{k} {v:.3f}" for k, v in o.items() if k.endswith("ms")), flush=True)
    return outs


def kernel_gaps(events, top=8):
    """Idle time between consecutive device kernels of one stream, from (name, duration_ns, start_ns,
    stream) events: (total idle ns, [(ns, count, "previous -> next")] the largest sums by the pair of
    kernel names). A gap is the next kernel's start minus the previous one's end; overlaps count
    as 0."""
    by_stream = {}
    for nm, dur, start, line in events:
        by_stream.setdefault(line, []).append((start, start + dur, nm[:60]))
    total, pairs = 0.0, {}
    for evs in by_stream.values():
        evs.sort()
        for (_, end0, nm0), (start1, _, nm1) in zip(evs, evs[1:]):
            gap = max(0.0, start1 - end0)
            total += gap
            g, c = pairs.get(f"{nm0} -> {nm1}", (0.0, 0))
            pairs[f"{nm0} -> {nm1}"] = (g + gap, c + 1)
    rows = sorted(((g, c, k) for k, (g, c) in pairs.items()), reverse=True)[:top]
    return total, rows


def profile_top(call, n_steps, top=25):
    """Device kernels of one call under the profiler: per step time and count, by name, and the idle
    time between kernels (`kernel_gaps`)."""
    from jax._src.lib import _profiler
    from bench_kernels import _gpu_kernel_events
    sess = _profiler.ProfilerSession()
    out = call()
    jax.block_until_ready(out)
    copies = []
    timed_events = _gpu_kernel_events(sess.stop(), with_times=True, copies=copies)
    events = [(nm, d) for nm, d, _, _ in timed_events]
    gap_ns, gap_rows = kernel_gaps(timed_events)
    copy_ns = sum(d for _, d, _, _ in copies)
    by = {}
    for nm, d in events:
        key = nm[:80]
        t, c = by.get(key, (0.0, 0))
        by[key] = (t + d * 1e-9 / n_steps, c + 1 / n_steps)
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])[:top]
    total = sum(t for t, _ in by.values())
    print(f"#   profile: {total * 1e3:.3f} ms of kernels per step, {len(events) / n_steps:.0f} kernels per step, "
          f"{gap_ns * 1e-6 / n_steps:.3f} ms idle between them; {len(copies) / n_steps:.1f} memcpy / memset per "
          f"step, {copy_ns * 1e-6 / n_steps:.3f} ms")
    for nm, (t, c) in rows:
        print(f"#   {t * 1e6:9.1f} us  x{c:5.1f}  {nm}")
    for g, c, pair in gap_rows:
        print(f"#   idle {g * 1e-3 / n_steps:7.1f} us per step over {c / n_steps:5.1f} gaps ({g / max(c, 1):6.0f} ns "
              f"each): {pair}")
    return {"kernel_ms_per_step": total * 1e3, "kernels_per_step": len(events) / n_steps,
            "idle_ms_per_step": gap_ns * 1e-6 / n_steps, "copies_per_step": len(copies) / n_steps,
            "copy_ms_per_step": copy_ns * 1e-6 / n_steps,
            "idle_top": [(pair, g * 1e-3 / n_steps, c / n_steps) for g, c, pair in gap_rows],
            "top": [(nm, t * 1e6, c) for nm, (t, c) in rows], "_out": out}


def memory_model(config, params, draft, context, args):
    """Bytes each method keeps on the GPU at a context (params + caches built from pytrees)."""
    g = args.gamma
    fp = jax.eval_shape(lambda: CacheSpec(context + 256, "fp", "bfloat16").init(config, 1))
    q8 = jax.eval_shape(lambda: CacheSpec(context + 256, "int8", "bfloat16", args.kv_group, g + 1).init(config, 1))

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
    p = nbytes(params)
    d = 0 if draft is None else nbytes([l for l in jax.tree_util.tree_leaves(draft) if l.dtype == jnp.uint8 or
                                        l.dtype == jnp.float16])
    return {"mem_ar_fp": p + nbytes(fp), "mem_quantspec": p + d + nbytes(q8),
            "mem_streaming_shared": p + nbytes(fp),
            "mem_streaming_magicdec": p + nbytes(fp) + nbytes(fp) // 4}


def kv_bytes_fp(config, s):
    return 2 * config.num_layers * config.num_kv_heads * s * config.head_dim * 2


def bench(args):
    config = SHAPES[args.shape]
    opts = ForwardOptions(backend=args.backend, fixed_rows=args.fixed_rows, draft_history=args.draft_history,
                          target_history=args.target_history, l2_prefetch=int(args.l2_prefetch_mb * 2**20),
                          fused_projection=not args.unfused_projection)
    dev = jax.devices()[0]
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    params = init_random_params(config, key, jnp.bfloat16, scale=0.02)
    wbytes = param_bytes(params)
    print(f"# {dev.device_kind}: params {wbytes / 1e9:.2f} GB ready in {time.perf_counter() - t0:.1f}s", flush=True)
    ceiling = copy_ceiling()
    print(f"# copy ceiling {ceiling / 1e12:.2f} TB/s", flush=True)
    draft = None
    if {"draft", "round"} & set(args.parts):
        draft = make_draft(params, DraftRecipe(group_size=args.weight_group))
    rows = []
    n = args.steps
    g = args.gamma
    n_cap = max(n, args.steps_long)  # the cache holds the longer loop's tokens
    for context in args.contexts:
        cap = context + n_cap * (g + 1) + 2 * args.kv_group
        res = {"context": context, "card": dev.device_kind}
        if "ar" in args.parts:
            spec = CacheSpec(capacity=cap, kind="fp", dtype="bfloat16", spec_room=1)
            cache = random_cache(spec, config, context, key)

            @functools.partial(jax.jit, donate_argnums=(1,))
            def ar_steps(p, cache, tok, steps):
                def body(i, c):
                    cache, tok = c
                    pos = cache.lengths[:, None]
                    h, cache = forward(p, config, tok[:, None], pos, cache, opts=opts)
                    tok = jnp.argmax(lm_logits(p, h[:, 0], opts), -1).astype(jnp.int32)
                    return cache.commit(cache.lengths + 1), tok
                return jax.lax.fori_loop(0, steps, body, (cache, tok))

            tok = jnp.zeros((1,), jnp.int32)
            compiled = ar_steps.lower(params, cache, tok, jnp.int32(n)).compile()

            def run(k):
                nonlocal cache, tok
                # chain the donated cache through calls; reset the length so context stays fixed
                cache = cache.replace(lengths=jnp.full((1,), context, jnp.int32))
                t = time.perf_counter()
                cache, tok = compiled(params, cache, tok, jnp.int32(k))
                jax.block_until_ready(tok)
                return time.perf_counter() - t
            step, per_call = per_step(run, n, args.steps_long, args.repeats)
            report(res, "ar", step, per_call, None)
            if args.profile:
                cache = cache.replace(lengths=jnp.full((1,), context, jnp.int32))
                res["ar_profile"] = profile_top(lambda c_=cache: compiled(params, c_, tok, jnp.int32(n)), n)
                cache = res["ar_profile"].pop("_out")[0]
            # bytes: all weights but the embedding (gathered rows), the KV cache read over the attended length
            nbytes = wbytes - params.embed.size * 2 * (0 if config.tie_word_embeddings else 1) + kv_bytes_fp(config, context)
            res.update(ar_ms=step * 1e3, ar_bytes=nbytes, ar_tbps=nbytes / step / 1e12,
                       ar_frac_ceiling=nbytes / step / ceiling)
            print(f"# ctx {context}: AR {step * 1e3:.3f} ms, {nbytes / step / 1e12:.2f} TB/s "
                  f"({100 * nbytes / step / ceiling:.0f}% of copy)", flush=True)
            del cache
        rows.append(res)
    if {"draft", "verify", "round", "stream", "flush"} & set(args.parts):
        # one compilation at the largest context; kernels read only each row's visible length
        cap = max(args.contexts) + n_cap * (max([g] + args.verify_gammas) + 1) + 2 * args.kv_group
        for res, part in zip(rows, spec_parts(args, config, params, draft, args.contexts, cap, key, opts, n, g)):
            res.update(part)
    for res in rows:
        res.update(memory_model(config, params, draft, res["context"], args))
    prefill = None
    if args.prefill:
        t_len = args.prefill
        spec = CacheSpec(capacity=t_len + 256, kind="fp", dtype="bfloat16", spec_room=1)
        toks = jax.random.randint(key, (1, t_len), 0, config.vocab_size, jnp.int32)
        lens = jnp.full((1,), t_len, jnp.int32)
        f = jax.jit(lambda p, t, l: prefill_cache(p, config, t, l, cache_spec=spec, opts=opts)[0])
        secs = timed(f, params, toks, lens, repeats=1)
        prefill = {"tokens": t_len, "seconds": secs, "tokens_per_s": t_len / secs}
        print(f"# prefill {t_len} tokens: {secs:.2f} s ({t_len / secs:.0f} tok/s)", flush=True)
    mem = dev.memory_stats() or {}
    return {"shape": args.shape, "config": dataclasses.asdict(config), "card": dev.device_kind, "gamma": g,
            "kv_group": args.kv_group,
            "date": time.strftime("%Y-%m-%d"), "copy_ceiling_tbps": ceiling / 1e12, "weight_bytes": wbytes,
            "rows": rows, "prefill": prefill, "peak_bytes_in_use": mem.get("peak_bytes_in_use"),
            "timing": (f"slope between {n} and {args.steps_long} steps per call" if args.steps_long
                       else f"per call of {n} steps / {n}"),
            "command": " ".join(sys.argv)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--parts", nargs="+", default=["ar"], choices=["ar", "draft", "verify", "round", "stream", "flush"])
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed loop")
    p.add_argument("--steps-long", type=int, default=0,
                   help="also time loops of this many steps and report the per-step slope between the two "
                        "lengths (leaves out the per-call overhead; the per-call averages stay in the JSON)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--verify-gammas", type=int, nargs="*", default=[],
                   help="also time the verify pass for these gammas (for the best gamma per context)")
    p.add_argument("--kv-group", type=int, default=128)
    p.add_argument("--weight-group", type=int, default=128)
    p.add_argument("--prefill", type=int, default=0, help="also time prefill of this many tokens")
    p.add_argument("--backend", default="auto")
    p.add_argument("--draft-history", default="auto", choices=["auto", "triton", "mosaic"],
                   help="the draft attention's history kernel (ForwardOptions.draft_history)")
    p.add_argument("--target-history", default="auto", choices=["auto", "triton", "mosaic"],
                   help="the target's (verify, AR step over the hierarchical cache) history kernel "
                        "(ForwardOptions.target_history)")
    p.add_argument("--unfused-projection", action="store_true",
                   help="the draft's q / k / v GEMV and qkv_to_cache as two kernels (ForwardOptions.fused_projection)")
    p.add_argument("--l2-prefetch-mb", type=float, default=24,
                   help="ForwardOptions.l2_prefetch in MiB: weights after the attention that the Mosaic "
                        "attention prefetches into L2 (0: none)")
    p.add_argument("--fixed-rows", type=int, default=0,
                   help="ForwardOptions.fixed_rows (the GPU-exact mode): target forwards on this many rows")
    p.add_argument("--diagnose-no-cache-write", action="store_true",
                   help="diagnostic only: skip the KV write (wrong results) to price the in-loop cache update")
    p.add_argument("--diagnose-skip", nargs="*", default=[], choices=["merge"],
                   help="diagnostic only (wrong results): the decoder without these kernels, to price fusing "
                        "them away; merge: split 0's partial output (one XLA slice) is the attention output")
    p.add_argument("--profile-top", type=int, default=12, help="kernels listed per round profile")
    p.add_argument("--profile", action="store_true", help="AR: device kernels of one call by name (profiler)")
    p.add_argument("--hlo-dir", default=None, help="write the compiled draft-step loop's HLO here (fusion names)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.steps_long and args.steps_long <= args.steps:
        p.error(f"--steps-long ({args.steps_long}) must exceed --steps ({args.steps})")
    if args.diagnose_no_cache_write:
        import qspec_jax.kv_cache as kvc
        kvc.write_rows = lambda buf, new, start: buf
    if "merge" in args.diagnose_skip:
        import pallas_kernels.hier_attention as ha

        def no_merge(o, m, l, *, t, r, out_dtype, second=None, **_):
            o2 = second[0] if second is not None else o  # [B, KVH, S', D, rows] (Mosaic) or [B, KVH, S', rows, D]
            b, kvh, d = o2.shape[0], o2.shape[1], o2.shape[3] if second is not None else o2.shape[4]
            x = o2[:, :, 0, :, :t * r] if second is not None else jnp.swapaxes(o2[:, :, 0, :t * r], -1, -2)
            return x.reshape(b, kvh, d, t, r).transpose(0, 3, 1, 4, 2).reshape(b, t, kvh * r, d).astype(out_dtype)
        ha.merge_partials = no_merge
    result = bench(args)
    text = json.dumps(result, indent=1)
    for path in filter(None, [args.json, os.path.join(os.environ["OUT"], f"bench_decode_{args.shape}_{'-'.join(args.parts)}.json")
                              if os.environ.get("OUT") else None]):
        with open(path, "w") as f:
            f.write(text)
    print(f"\n{result['card']}, copy ceiling {result['copy_ceiling_tbps']:.2f} TB/s")
    print("| context | AR ms | AR TB/s | % copy | draft ms | verify ms | round ms | stream ms |")
    print("|---|---|---|---|---|---|---|---|")

    def f(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if r.get(k) is not None else ""
    for r in result["rows"]:
        print(f"| {r['context']} | {f(r, 'ar_ms')} | {f(r, 'ar_tbps', '{:.2f}')} | "
              f"{f(r, 'ar_frac_ceiling', '{:.0%}')} | {f(r, 'draft_ms')} | "
              f"{f(r, 'verify_ms')} | {f(r, 'round_ms')} | {f(r, 'stream_draft_ms')} |")


if __name__ == "__main__":
    main()
