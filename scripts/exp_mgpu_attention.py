#!/usr/bin/env python
"""GPU checks and timings of the Mosaic GPU attention (`pallas_kernels/mgpu_attention.py`) against
dequantize-then-attend, the reference and the Triton `hier_attention`, one run on one card.

    PYTHONPATH=. python3 scripts/exp_mgpu_attention.py [--contexts 32768,65536,131072] [--json PATH]
    PYTHONPATH=. python3 scripts/exp_mgpu_attention.py --once   # two calls at 32K (for ncu)
    PYTHONPATH=. python3 scripts/exp_mgpu_attention.py --skip-checks --contexts 32768,131072 --splits 17,33 \
        --stages 2,3 --roles 1d   # a sweep of the history programs and the pipeline depth
    PYTHONPATH=. python3 scripts/exp_mgpu_attention.py --skip-checks --contexts 32768,131072 --splits 33 \
        --roles 1d,4v --merge-blocks 32,16,8   # the merge kernel's channel block

Prints, then writes JSON (--json, default $OUT/mgpu_attention.json when $OUT is set):
- the partials' error against dequantize-then-attend (draft view: upper planes; target view: the
  INT8 code of both planes), with per-row lengths;
- `hier_attention(history="mosaic")` and the Triton path against the reference: the draft (T = 1)
  and verify passes of T = 4 and 8 tokens (GQA 4) whose tokens straddle a group boundary;
- a table per context: the draft (T = 1, upper plane) and the verify (T = 4, 8; both planes), each
  through `hier_attention` with its buffer part and merge, Triton against Mosaic, and the dense
  bf16 XLA attention (einsum-softmax-einsum) over the same context, as scripts/bench_kernels.py
  times them (device kernel time from the profiler, rotating copies past the L2).

Session 11's prototype variants live in git history (scripts/exp_mgpu_draft_attention.py at
8ba3225); docs/benchmarks.md (sessions 11-12) has their timings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

G = D = 128
H = D // 2


def random_cache(rng, b, kvh, sq, lower):
    u8 = lambda shape: jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)  # noqa: E731
    f16 = lambda lo, hi, shape: jnp.asarray(rng.uniform(lo, hi, shape), jnp.float16)  # noqa: E731
    c = (u8((b, kvh, sq, H)), f16(0.05, 0.2, (b, kvh, sq // G, D)), f16(-0.6, 0.6, (b, kvh, sq // G, D)),
         u8((b, kvh, sq // G, H, G)), f16(0.05, 0.2, (b, kvh, sq, 1)), f16(-0.6, 0.6, (b, kvh, sq, 1)))
    return c, ((u8((b, kvh, sq, H)), u8((b, kvh, sq // G, H, G))) if lower else (None, None))


def check_partials(out: dict) -> None:
    """attention_partials (per-row lengths, the cache's own arrays) against dequantize-then-attend."""
    from pallas_kernels.mgpu_attention import attention_partials, mosaic_query_rows
    from qspec_jax import kv_quant
    rng = np.random.default_rng(0)
    b, kvh, sq, n = 2, 8, 8192, 16
    for lower in (False, True):
        c, (kl, vl) = random_cache(rng, b, kvh, sq, lower)
        qlen = jnp.asarray([[sq], [3 * G]], jnp.int32)
        q16 = mosaic_query_rows(jnp.asarray(rng.standard_normal((b, kvh, 4, D)) * 0.3, jnp.float32))
        o, m, l = (np.asarray(a, np.float64) for a in attention_partials(q16, *c, qlen, k_lower=kl, v_lower=vl,
                                                                         num_splits=32))
        w = np.exp2(m - m.max(2, keepdims=True))
        got = ((o * w[:, :, :, None, :]).sum(2) / (w * l).sum(2)[:, :, None, :]).transpose(0, 1, 3, 2)
        k = np.asarray(kv_quant.dequantize_keys(c[0], kl, c[1], c[2], G), np.float64)
        v = np.asarray(kv_quant.dequantize_values(kv_quant.values_token_major(c[3]),
                                                  None if vl is None else kv_quant.values_token_major(vl),
                                                  c[4], c[5]), np.float64)
        q = np.asarray(q16.astype(jnp.float32), np.float64).transpose(0, 1, 3, 2, 4).reshape(b, kvh, n, D)
        for bi, ln in enumerate(np.asarray(qlen)[:, 0]):
            s_ = np.einsum("hnd,htd->hnt", q[bi], k[bi, :, :ln])
            p = np.exp2(s_ - s_.max(-1, keepdims=True))
            ref = np.einsum("hnt,htd->hnd", p / p.sum(-1, keepdims=True), v[bi, :, :ln])[:, :4]
            err = float(np.abs(got[bi, :, :4] - ref).max() / np.abs(ref).max())
            view = "target" if lower else "draft"
            out.setdefault("partials", []).append(dict(view=view, row=bi, qlen=int(ln), err=err))
            print(f"partials {view} row {bi} (qlen {ln}): max rel err {err:.2e}")


def check_hier(out: dict) -> None:
    """hier_attention(history="mosaic") and Triton against the reference, history + buffer."""
    from bench_kernels import quantized_case
    from pallas_kernels.hier_attention import hier_attention, hier_attention_reference
    cases = [(1, False, [8000]), (1, False, [8190, 300]), (1, False, [255, 4100]),
             (4, True, [8000]), (4, True, [3 * G - 2, 300]), (8, True, [5 * G - 5, 4100]), (1, True, [7000, 200])]
    for t, lower, lens in cases:
        args = quantized_case(np.random.default_rng(len(lens) + t), len(lens), t, 8, 4, D, G, 8192, 272 + 16, lens,
                              jnp.bfloat16)
        f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
        ref = np.asarray(hier_attention_reference(*f32, group_size=G, use_lower=lower), np.float64)
        for hist in ("triton", "mosaic"):
            got = np.asarray(hier_attention(*args, group_size=G, use_lower=lower, history=hist), np.float64)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            out.setdefault("hier", []).append(dict(t=t, lower=lower, lens=lens, history=hist, err=err))
            print(f"hier_attention T={t} lower={lower} lens={lens} history={hist}: max rel err {err:.2e}")


def timings(out: dict, contexts) -> None:
    import bench_kernels as bk
    bk.PROFILE = True
    targs = argparse.Namespace(reps=5, max_copies=32)
    rows = []
    for ctx in contexts:
        for t, lower in ((1, False), (4, True), (8, True)):
            rec = {"ctx": ctx, "t": t, "lower": lower}
            for hist in ("triton", "mosaic"):
                r = bk.time_attention(targs, ctx, t, lower, {"history": hist}, xla=hist == "mosaic", tag=hist)
                rec[hist] = r
            rows.append(rec)
            tr, mo = rec["triton"].get("time_s"), rec["mosaic"].get("time_s")
            xs = rec["mosaic"].get("xla_s")
            print(f"ctx {ctx} T={t} {'both planes' if lower else 'upper'}: triton {tr and tr * 1e6:.1f} us, "
                  f"mosaic {mo and mo * 1e6:.1f} us ({rec['mosaic'].get('tb_s', 0):.2f} TB/s), "
                  f"xla bf16 {xs and xs * 1e6:.1f} us -> {xs and mo and xs / mo:.2f}x", flush=True)
    out["timings"] = rows
    print("\n| context | role | Triton us | Mosaic us | Mosaic TB/s | bf16 XLA us | Mosaic vs bf16 | Triton vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for rec in rows:
        tr, mo = rec["triton"].get("time_s", float("nan")), rec["mosaic"].get("time_s", float("nan"))
        xs = rec["mosaic"].get("xla_s", float("nan"))
        role = "draft T=1" if rec["t"] == 1 else f"verify T={rec['t']}"
        print(f"| {rec['ctx'] // 1024}K | {role} | {tr * 1e6:.1f} | {mo * 1e6:.1f} | "
              f"{rec['mosaic'].get('tb_s', 0):.2f} | {xs * 1e6:.1f} | {xs / mo:.2f}x | {xs / tr:.2f}x |")


def splits_sweep(out: dict, contexts, splits, roles, stages=(None,)) -> None:
    """hier_attention(history="mosaic") with mosaic_splits in `splits` (history programs + the buffer's)
    and the kernel's pipeline depth in `stages` (None: attention_partials' default)."""
    import functools

    import bench_kernels as bk

    import pallas_kernels.mgpu_attention as ma
    bk.PROFILE = True
    targs = argparse.Namespace(reps=5, max_copies=32)
    kernel = ma.attention_partials
    for st in stages:  # (hier_attention looks the kernel up in the module at each call)
        ma.attention_partials = kernel if st is None else functools.partial(kernel, stages=st)
        jax.clear_caches()
        for ctx in contexts:
            for t, lower in roles:
                for sp in splits:
                    r = bk.time_attention(targs, ctx, t, lower, {"history": "mosaic", "mosaic_splits": sp}, xla=False)
                    merge_s = sum(v[1] for k, v in (r.get("breakdown") or {}).items() if "merge" in k)
                    out.setdefault("splits", []).append(dict(ctx=ctx, t=t, lower=lower, splits=sp, stages=st,
                                                             time_s=r.get("time_s"), merge_s=merge_s))
                    us = r.get("time_s", float("nan")) * 1e6
                    print(f"splits ctx {ctx} T={t} lower={lower} mosaic_splits={sp} stages={st}: {us:.1f} us "
                          f"(merge kernel {merge_s * 1e6:.2f})", flush=True)
    ma.attention_partials = kernel


def run_once(ctx: int = 32768) -> None:
    """Two calls of the draft history kernel at ctx on host-made inputs (no other kernels): for ncu."""
    from pallas_kernels.mgpu_attention import attention_partials
    rng = np.random.default_rng(0)
    c, _ = random_cache(rng, 1, 8, ctx, False)
    q16 = jnp.asarray(rng.standard_normal((1, 8, 2, 16, H)), jnp.float16)
    fn = jax.jit(lambda *a: attention_partials(*a, num_splits=32))
    for _ in range(2):
        jax.block_until_ready(fn(q16, *c, jnp.asarray([[ctx]], jnp.int32)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--once", action="store_true", help="two draft calls at 32K, nothing else (for ncu)")
    ap.add_argument("--contexts", default="32768,65536,131072")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--splits", default="", help="S,S,...: time mosaic_splits values instead of the table")
    ap.add_argument("--roles", default="1d,4v,8v",
                    help="with --splits: T and view (d draft, v verify), comma-separated")
    ap.add_argument("--stages", default="", help="with --splits: S,S,...: the pipeline depths to time")
    ap.add_argument("--merge-blocks", default="",
                    help="with --splits: C,C,...: time again per merge_partials channel block (MERGE_BLOCK_D)")
    ap.add_argument("--probe-unpack", action="store_true",
                    help="with --splits: time again with the dequantization replaced by constants (wrong results: "
                         "what the unpacking costs)")
    ap.add_argument("--json", default=os.path.join(os.environ["OUT"], "mgpu_attention.json") if os.environ.get("OUT")
                    else None)
    args = ap.parse_args()
    if args.once:
        run_once()
        return 0
    out = {"card": jax.devices()[0].device_kind, "jax": jax.__version__}
    if not args.skip_checks:
        check_partials(out)
        check_hier(out)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.splits:
        roles = [(int(x[:-1]), x[-1] == "v") for x in args.roles.split(",")]
        splits = [int(v) for v in args.splits.split(",")]
        stages = [int(v) for v in args.stages.split(",")] if args.stages else [None]
        if args.merge_blocks:
            import pallas_kernels.hier_attention as ha
            default_block = ha.MERGE_BLOCK_D
            for c in [int(v) for v in args.merge_blocks.split(",")]:
                ha.MERGE_BLOCK_D = c
                n0 = len(out.get("splits", []))
                splits_sweep(out, contexts, splits, roles, stages)
                for rec in out["splits"][n0:]:
                    rec["merge_block_d"] = c
            ha.MERGE_BLOCK_D = default_block  # (the probe below times the default)
        else:
            splits_sweep(out, contexts, splits, roles, stages)
        if args.probe_unpack:  # the same calls with A constant: no unpacking (and no tile loads to feed it)
            import jax.experimental.pallas.mosaic_gpu as plgpu

            import pallas_kernels.mgpu_attention as ma

            def no_unpack(x, lower, low, high, interpret):
                one = plgpu.layout_cast(jnp.full(x.shape, 0.01, jnp.float16), ma.WGMMA)
                return one, one
            ma.dequant = no_unpack
            jax.clear_caches()
            n0 = len(out["splits"])
            splits_sweep(out, contexts, splits, roles, stages)
            for rec in out["splits"][n0:]:
                rec["probe"] = "no_unpack"
    else:
        timings(out, contexts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
