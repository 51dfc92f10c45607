"""GPU check and benchmark of the Pallas kernels (INT4 matmul, hierarchical attention).

  PYTHONPATH=. python3 scripts/bench_kernels.py                 # check + time, defaults
  PYTHONPATH=. python3 scripts/bench_kernels.py --sweep         # + block-size sweep (see --sweep-mm)
  PYTHONPATH=. python3 scripts/bench_kernels.py --smoke         # tiny, interpret mode (CPU)

(a) each kernel against its reference on the device at a few sizes (awkward ones
included): max and Frobenius relative error; (b) timings at the Llama-3.1-8B shape
(32 query heads, 8 KV heads, head_dim 128, batch 1, G=128): draft attention (T=1,
upper plane) and verify attention (T=8, both planes) vs XLA einsum-softmax-einsum over
a dense bf16 cache of the same context; INT4 matmul (K-major layout, `int4_matmul`) at
M=1,4,8 vs bf16 x @ W, at the 8B model's shapes (fused q/k/v 4096x6144, o 4096x4096, fused
gate/up 4096x28672, down 14336x4096, lm_head 4096x128256, and 4096x14336 / 4096x1024).
--fused checks and times the INT4 GEMV's fused forms at the decoder layer's four GEMVs
(RMSNorm + qkv, o + residual, RMSNorm + gate/up + silu * up, down + residual) against the
same kernel with XLA doing the norm / activation / add around it.
--sweep times every INT4 config of block_n 8/16/32 x groups_per_step 8/16/32 x num_warps
2/4/8 x prefetch off/on on the --sweep-mm shapes, then attention variants.

Timing: n distinct copies of the op's inputs (n chosen so the copies exceed ~4x the 50 MB
L2, so no call finds its data in L2); one executable calls the op on --calls-per-jit
consecutive copies; executables are dispatched back to back over all copies `reps`
times, then blocked on; time per call = wall time / calls. This includes launch gaps
and, for calls shorter than the host's dispatch time, host overhead: small cases are
upper bounds. --profile adds the sum of device kernel durations per call from the JAX
profiler when CUPTI reports kernels. Bytes are what a call must read (packed codes +
stats, or the bf16 cache/weights); TB/s is bytes/time. The copy ceiling is a measured
elementwise device copy (read + write bytes / time). Full JSON goes to $OUT/bench_kernels.json when
$OUT is set, and to docs/bench_kernels.json with --write-docs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.hier_attention import hier_attention, hier_attention_reference  # noqa: E402
from pallas_kernels.int4_matmul import int4_fused_reference, int4_matmul, int4_matmul_reference  # noqa: E402
from qspec_jax import kv_quant  # noqa: E402
try:
    from qspec_jax.quant_weights import quantize_rtn  # noqa: E402
except ImportError:  # no flax on the device: same RTN quantizer and layout, returned as a namespace
    import types

    def quantize_rtn(w, group_size=128):
        """qspec_jax.quant_weights.quantize_rtn without flax: packed uint8 [N, n_groups, G/2]
        (K-major), scale / minimum f16 [N, n_groups]."""
        w = jnp.asarray(w, jnp.float32)
        k, n = w.shape
        ng = -(-k // group_size)
        valid = (jnp.arange(ng * group_size) < k).reshape(ng, group_size, 1)
        wp = jnp.pad(w, ((0, ng * group_size - k), (0, 0))).reshape(ng, group_size, n)
        mn = jnp.min(jnp.where(valid, wp, jnp.inf), axis=1).astype(jnp.float16)
        mx = jnp.max(jnp.where(valid, wp, -jnp.inf), axis=1)
        sc = ((mx - mn.astype(jnp.float32)) / 15.0).astype(jnp.float16)
        s32 = sc.astype(jnp.float32)[:, None, :]
        codes = jnp.round(jnp.clip((wp - mn.astype(jnp.float32)[:, None, :]) / jnp.where(s32 > 0, s32, 1.0), 0, 15))
        codes = jnp.where(valid & (s32 > 0), codes, 0).astype(jnp.uint8)
        half = group_size // 2
        packed = (codes[:, :half] | (codes[:, half:] << 4)).astype(jnp.uint8)  # [ng, G/2, N]
        return types.SimpleNamespace(packed=jnp.transpose(packed, (2, 0, 1)), scale=sc.T, minimum=mn.T,
                                     in_features=k, group_size=group_size)

L2_BYTES = 50 * 2**20
MIN_CALLS = 100
PROFILE = False
CALLS_PER_JIT = 4
MM_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256), (4096, 14336), (4096, 1024)]
RESULTS: dict = {"meta": {}, "copy": {}, "check": [], "matmul": [], "attention": [], "sweep": [], "fused": [],
                 "errors": []}
T_START = time.time()


def log(*a):
    print(*a, flush=True)


def over_deadline(args) -> bool:
    return args.max_seconds and time.time() - T_START > args.max_seconds


def dump(args):
    text = json.dumps(RESULTS, indent=1, default=str)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_kernels.json"), "w") as f:
            f.write(text)
    if args.write_docs:
        os.makedirs("docs", exist_ok=True)
        with open(os.path.join("docs", "bench_kernels.json"), "w") as f:
            f.write(text)


def _short(rec):
    keep = {k: v for k, v in rec.items() if k not in ("kernel", "kw")}
    kw = {k: v for k, v in rec.get("kw", {}).items() if v is not None and k != "interpret"}
    return f"{keep} {kw}"


def rel_errs(y, r):
    y = np.asarray(y, np.float32)
    r = np.asarray(r, np.float32)
    fro = float(np.linalg.norm(y - r) / max(np.linalg.norm(r), 1e-30))
    mx = float(np.max(np.abs(y - r)) / max(np.max(np.abs(r)), 1e-30))
    return fro, mx


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

def n_copies(nbytes: int, cap: int) -> int:
    return int(max(1, min(cap, math.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def _gpu_kernel_events(xspace: bytes, with_times: bool = False, copies: list | None = None):
    """(name, duration_ns) of the device kernels in a serialized XSpace; with_times: (name,
    duration_ns, start_ns, stream line name). copies: a list that receives the memcpy / memset
    events (the same tuples), which are not kernels."""
    from jax._src import profiler as _prof
    data = _prof.ProfileData.from_serialized_xspace(xspace)
    events, lines_seen = [], set()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = list(plane.lines)
        stream_lines = [ln for ln in lines if ln.name.startswith("Stream")] or \
            [ln for ln in lines if "XLA" not in ln.name and "Launch" not in ln.name]
        for ln in stream_lines:
            lines_seen.add(ln.name)
            for ev in ln.events:
                nm = ev.name
                if nm.lower().startswith(("memcpy", "memset")):
                    if copies is not None:
                        copies.append((nm, float(ev.duration_ns), float(ev.start_ns), ln.name) if with_times
                                      else (nm, float(ev.duration_ns)))
                    continue
                events.append((nm, float(ev.duration_ns), float(ev.start_ns), ln.name) if with_times
                              else (nm, float(ev.duration_ns)))
    RESULTS["meta"].setdefault("profile_lines", sorted(lines_seen)[:8])
    return events


def time_calls(fn, arg_sets, *, reps: int, main_kernel: tuple = ()):
    """Time fn over rotating arg_sets.

    One executable calls fn on CALLS_PER_JIT consecutive arg sets (so the host dispatches
    once per CALLS_PER_JIT calls: a Python loop of single small calls is host bound at
    ~50-100 us per call); the executables are dispatched back to back over all sets
    `reps` times, then blocked on. Returns dict: wall_s (per call), and with --profile
    kernel_s (sum of device kernel durations per call, from the profiler), main_s (the
    kernel whose name contains main_kernel), kernels (device kernels per call).
    """
    from jax._src.lib import _profiler
    k = max(1, min(CALLS_PER_JIT, len(arg_sets)))
    groups = [[arg_sets[(i + j) % len(arg_sets)] for j in range(k)] for i in range(0, len(arg_sets), k)]

    @jax.jit
    def f(group):
        return [fn(*a) for a in group]

    jax.block_until_ready(f(groups[0]))
    jax.block_until_ready([f(gr) for gr in groups])
    reps = max(reps, -(-MIN_CALLS // (len(groups) * k)))
    n_calls = reps * len(groups) * k
    sess = _profiler.ProfilerSession() if PROFILE else None
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        for gr in groups:
            out = f(gr)  # only the last result is kept alive: 100 copy outputs of 1 GiB do not fit
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) / n_calls
    events = _gpu_kernel_events(sess.stop()) if sess is not None else []
    del out
    if not events:
        return dict(kernel_s=wall, main_s=None, kernels=None, wall_s=wall, profiled=False)
    total = sum(d for _, d in events) * 1e-9 / n_calls
    main = None
    if main_kernel:
        ds = [d for nm, d in events if any(mk in nm for mk in main_kernel)]
        main = (sum(ds) * 1e-9 / n_calls) if ds else None
    names = {}
    for nm, d in events:
        names.setdefault(nm[:60], []).append(d)
    breakdown = {nm: (len(v) / n_calls, float(np.median(v)) * 1e-9) for nm, v in names.items()}
    return dict(kernel_s=total, main_s=main, kernels=len(events) / n_calls, wall_s=wall, profiled=True,
                breakdown=breakdown)


def copies_of(arrs, n):
    """n device copies of a tuple of arrays (first is the original)."""
    out = [tuple(arrs)]
    for _ in range(n - 1):
        out.append(tuple(jnp.array(a, copy=True) for a in arrs))
    jax.block_until_ready(out)
    return out


def measure_copy(args):
    nbytes = args.copy_mib << 20
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    fn = lambda a: a * jnp.bfloat16(1.0009765625)  # noqa: E731  read + write
    res = time_calls(fn, [(x,)], reps=5)
    med = res["kernel_s"]
    tbs = 2 * nbytes / med / 1e12
    RESULTS["copy"] = {"bytes_rw": 2 * nbytes, "time_s": med, "tb_s": tbs, "profiled": res["profiled"]}
    log(f"copy ceiling: {tbs:.2f} TB/s (read+write of {nbytes / 2**30:.0f} GiB in {med * 1e3:.3f} ms)")
    del x
    return tbs


# ---------------------------------------------------------------------------------------
# INT4 matmul
# ---------------------------------------------------------------------------------------

def mm_kwargs(args, over=None):
    kw = dict(block_n=args.mm_block_n, groups_per_step=args.mm_groups_per_step, num_warps=args.mm_warps,
              num_stages=args.mm_stages, split_k=args.mm_split_k, prefetch=args.mm_prefetch or None)
    if args.interpret:
        kw["interpret"] = True
    kw.update(over or {})
    return kw


def random_int4(key, k, n, g):
    """Random packed weights in the K-major layout (timing only): uint8 [N, n_groups, G/2],
    f16 stats [N, n_groups]."""
    ng = -(-k // g)
    k1, k2, k3 = jax.random.split(key, 3)
    packed = jax.random.bits(k1, (n, ng, g // 2), jnp.uint8)
    scale = (jax.random.uniform(k2, (n, ng), jnp.float32, 0.001, 0.01)).astype(jnp.float16)
    mn = (-8 * scale.astype(jnp.float32) + 0.001 * jax.random.normal(k3, (n, ng))).astype(jnp.float16)
    return packed, scale, mn


def check_matmul(args, kw_list, first=None):
    rng = np.random.default_rng(0)
    cases = [(1, 4096, 14336, 128, jnp.bfloat16), (8, 14336, 4096, 128, jnp.bfloat16),
             (3, 300, 1000, 64, jnp.bfloat16), (5, 4096, 1024, 128, jnp.float16),
             (2, 1000, 200, 32, jnp.float32), (7, 2048, 640, 256, jnp.bfloat16),
             (1, 4096, 128256, 128, jnp.bfloat16), (4, 600, 37, 64, jnp.float32)]
    if args.smoke:
        cases = [(1, 256, 200, 64, jnp.bfloat16), (3, 300, 100, 32, jnp.float32)]
    for (m, k, n, g, dt) in cases[:first]:
        if over_deadline(args):
            return
        w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)
        qw = quantize_rtn(w, g)
        x = jnp.asarray(rng.standard_normal((m, k)), dt)
        with jax.default_matmul_precision("highest"):
            ref = int4_matmul_reference(x.astype(jnp.float32), qw.packed, qw.scale, qw.minimum, group_size=g)
        for kw in kw_list:
            kw = dict(kw)
            try:
                y = int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, **kw)
                fro, mx = rel_errs(y, ref)
                ok = fro < (1e-5 if dt == jnp.float32 else 1e-2)
                rec = dict(kernel="int4_matmul", m=m, k=k, n=n, g=g, dtype=jnp.dtype(dt).name, kw=kw, rel_fro=fro,
                           rel_max=mx, ok=ok)
            except Exception as e:  # record and go on
                rec = dict(kernel="int4_matmul", m=m, k=k, n=n, g=g, dtype=jnp.dtype(dt).name, kw=kw,
                           error=f"{type(e).__name__}: {str(e)[:400]}", ok=False)
            RESULTS["check"].append(rec)
            log("check mm", _short(rec))


def time_matmul(args, m, k, n, kw, *, bf16=True, tag="main"):
    g = 128
    key = jax.random.PRNGKey(k * 7 + n)
    packed, scale, mn = random_int4(key, k, n, g)
    qbytes = int(packed.size + 2 * scale.size + 2 * mn.size)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    rec = dict(m=m, k=k, n=n, g=g, kw=kw, int4_bytes=qbytes, tag=tag)
    try:
        sets = copies_of((packed, scale, mn), n_copies(qbytes, args.max_copies))
        fn = lambda p, s, mn_: int4_matmul(x, p, s, mn_, group_size=g, **kw)  # noqa: E731
        res = time_calls(fn, sets, reps=args.reps, main_kernel=("int4",))
        med = res["kernel_s"]
        rec.update(int4_s=med, int4_kernel_s=res["main_s"], int4_kernels=res["kernels"], int4_wall_s=res["wall_s"],
                   int4_tb_s=qbytes / med / 1e12, copies=len(sets), int4_breakdown=res.get("breakdown"))
        del sets
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        log("ERROR int4", m, k, n, kw, rec["error"])
    if bf16:
        wb = jax.random.normal(jax.random.PRNGKey(2), (k, n), jnp.float32).astype(jnp.bfloat16)
        bbytes = k * n * 2
        sets = copies_of((wb,), n_copies(bbytes, args.max_copies))
        fn = lambda w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)  # noqa: E731
        res = time_calls(fn, sets, reps=args.reps)
        med = res["kernel_s"]
        rec.update(bf16_bytes=bbytes, bf16_s=med, bf16_tb_s=bbytes / med / 1e12, bf16_kernels=res["kernels"],
                   bf16_wall_s=res["wall_s"])
        if "int4_s" in rec:
            rec["speedup"] = med / rec["int4_s"]
        del sets, wb
    return rec


# the decoder layer's GEMVs with their neighbours fused (norm prologue, silu * up, residual)
FUSED_OPS = [("qkv+norm", 4096, 6144, dict(norm=True)), ("o+residual", 4096, 4096, dict(residual=True)),
             ("gate_up+norm+silu", 4096, 14336, dict(norm=True, act="silu_mul")),
             ("down+residual", 14336, 4096, dict(residual=True))]


def _fused_inputs(m, k, n, spec, dt=jnp.bfloat16):
    key = jax.random.PRNGKey(k + 3 * n)
    ks = jax.random.split(key, 3)
    x = (2.0 * jax.random.normal(ks[0], (m, k), jnp.float32)).astype(dt)
    gw = (1 + 0.1 * jax.random.normal(ks[1], (k,), jnp.float32)).astype(dt) if spec.get("norm") else None
    res = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dt) if spec.get("residual") else None
    return x, gw, res


def _unfused(x, p, s, mn, gw, res, act, g, kw):
    """What the draft ran before: XLA RMSNorm, the kernel, XLA silu * up / residual add."""
    from qspec_jax.model import rms_norm
    h = rms_norm(x, gw, 1e-5) if gw is not None else x
    y = int4_matmul(h, p, s, mn, group_size=g, **kw)
    if act == "silu_mul":
        gate, up = jnp.split(y, 2, axis=-1)
        y = jax.nn.silu(gate) * up
    return y if res is None else res + y


def fused_ops(args):
    """Check each fused form against int4_fused_reference on the device, then time it
    against the unfused sequence (M = 1 and 2, bf16, G = 128)."""
    g = 128
    for m in (1, 2):
        for name, k, n, spec in FUSED_OPS:
            if over_deadline(args):
                return
            act = spec.get("act")
            nw = 2 * n if act else n
            rec = dict(op=name, m=m, k=k, n=n)
            with fused_record(args, rec, "fused"):
                rng = np.random.default_rng(k + n + m)
                qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, nw), np.float32) * 0.02), g)
                x, gw, res = _fused_inputs(m, k, n, spec)
                fk = dict(norm_weight=gw, norm_eps=1e-5, residual=res, act=act)
                y = int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, **fk)
                with jax.default_matmul_precision("highest"):
                    ref = int4_fused_reference(x.astype(jnp.float32), qw.packed, qw.scale, qw.minimum, group_size=g,
                                               **fk)
                rec["rel_fro"], rec["rel_max"] = rel_errs(y, ref)
                rec["ok"] = rec["rel_fro"] < 1e-2
                RESULTS["check"].append(dict(kernel="int4_fused", **rec))
                kw = mm_kwargs(args)
                variants = [("fused", lambda p, s, mn_: int4_matmul(x, p, s, mn_, group_size=g, **fk, **kw)),
                            ("unfused", lambda p, s, mn_: _unfused(x, p, s, mn_, gw, res, act, g, kw))]
                if gw is not None:  # the norm weight folded into W: the kernel without it, and without a norm
                    rk = dict(fk, norm_weight=None)
                    variants += [("rms_only", lambda p, s, mn_: int4_matmul(x, p, s, mn_, group_size=g, rms_only=True,
                                                                            **rk, **kw)),
                                 ("no_norm", lambda p, s, mn_: int4_matmul(x, p, s, mn_, group_size=g, **rk, **kw))]
                time_weight_variants(args, rec, variants, random_int4(jax.random.PRNGKey(k * 7 + nw), k, nw, g))


@contextlib.contextmanager
def fused_record(args, rec, label):
    """One fused-form record: an exception in the block is recorded in it (not raised), then it goes
    to RESULTS["fused"], the log and the JSON."""
    try:
        yield rec
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["ok"] = False
    RESULTS["fused"].append(rec)
    log(label, _short(rec))
    dump(args)


def time_weight_variants(args, rec, variants, weight):
    """Time each (tag, fn(packed, scale, minimum)) over rotating copies of the INT4 weight (past the
    L2): rec[tag_s] (kernel time per call), rec[tag_kernels], rec[tag_wall_s], rec["int4_bytes"]."""
    packed, scale, mn = weight
    rec["int4_bytes"] = int(packed.size + 2 * scale.size + 2 * mn.size)
    sets = copies_of(weight, n_copies(rec["int4_bytes"], args.max_copies))
    for tag, fn in variants:
        r = time_calls(fn, sets, reps=args.reps)
        rec[f"{tag}_s"], rec[f"{tag}_kernels"], rec[f"{tag}_wall_s"] = r["kernel_s"], r["kernels"], r["wall_s"]


def qkv_cache_op(args):
    """The draft's q / k / v projection with qkv_to_cache fused (`int4_qkv_to_cache`) against the two
    kernels it replaces (`int4_matmul` with the norm, then `qkv_to_cache`) at the Llama-3.1-8B shape
    (H 32, KVH 8, D 128, K 4096, G 128, bf16): the outputs compared (query rows, the written buffer
    slots; the unfused Pallas pair is the reference), then both timed over rotating weight copies."""
    from pallas_kernels.int4_matmul import int4_qkv_to_cache
    from pallas_kernels.qkv_to_cache import qkv_to_cache

    h, kvh, d, k, g, sb = (4, 2, 64, 256, 64, 16) if args.interpret else (32, 8, 128, 4096, 128, 272)
    n = (h + 2 * kvh) * d
    ik = dict(interpret=True) if args.interpret else {}
    for m, layout in ((1, "mosaic"), (1, "rows"), (2, "mosaic")):
        if over_deadline(args):
            return
        rec = dict(op=f"qkv_to_cache/{layout}", m=m, k=k, n=n)
        with fused_record(args, rec, "qkv_to_cache"):
            rng = np.random.default_rng(m)
            qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02), g)
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            gw = jnp.asarray(1 + 0.2 * rng.standard_normal(k), jnp.bfloat16)
            ang = jnp.asarray(rng.uniform(0, 6.3, (m, d // 2)), jnp.float32)
            cos, sin = (jnp.concatenate([f(ang)] * 2, axis=1) for f in (jnp.cos, jnp.sin))
            bk = jnp.asarray(rng.standard_normal((m, kvh, sb, d)), jnp.bfloat16)
            bv = jnp.asarray(rng.standard_normal((m, kvh, sb, d)), jnp.bfloat16)
            slot = jnp.asarray([sb // 7, sb - 3][:m], jnp.int32)
            heads = dict(num_heads=h, num_kv_heads=kvh, q_layout=layout, **ik)

            def fused(p, s_, mn_):
                return int4_qkv_to_cache(x, p, s_, mn_, gw, cos, sin, bk, bv, slot, norm_eps=1e-5, **heads)

            def unfused(p, s_, mn_):
                qkv = int4_matmul(x, p, s_, mn_, group_size=g, norm_weight=gw, norm_eps=1e-5, **ik)
                return qkv_to_cache(qkv[:, None], cos[:, None], sin[:, None], bk, bv, slot, **heads)

            got, want = jax.jit(fused)(qw.packed, qw.scale, qw.minimum), jax.jit(unfused)(qw.packed, qw.scale,
                                                                                          qw.minimum)
            rows = np.arange(m)
            for name, a, b_ in (("q", got[0], want[0]),
                                ("k", got[1][rows, :, np.asarray(slot)], want[1][rows, :, np.asarray(slot)]),
                                ("v", got[2][rows, :, np.asarray(slot)], want[2][rows, :, np.asarray(slot)])):
                rec[f"{name}_rel_fro"] = rel_errs(a, b_)[0]
                rec[f"{name}_bitwise"] = bool(np.array_equal(np.asarray(a, np.float32), np.asarray(b_, np.float32)))
            rec["ok"] = max(rec[f"{c}_rel_fro"] for c in "qkv") < 1e-2
            RESULTS["check"].append(dict(kernel="int4_qkv_to_cache", **rec))
            time_weight_variants(args, rec, (("fused", fused), ("unfused", unfused)), random_int4(jax.random.PRNGKey(n),
                                                                                              k, n, g))


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------

def at_kwargs(args, over=None):
    kw = dict(block_k=args.at_block_k, block_kb=args.at_block_kb, num_splits=args.at_splits,
              num_warps=args.at_warps, num_stages=args.at_stages, unpack=args.at_unpack)
    if args.at_history != "triton":  # the Mosaic GPU kernel (what the decoder runs on sm_90)
        kw["history"] = args.at_history
    if args.interpret:
        kw["interpret"] = True
    kw.update(over or {})
    return kw


def quantized_case(rng, b, t, kvh, r, d, g, sq, sb, lens, dt):
    h = kvh * r
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dt)
    k = jnp.asarray(rng.standard_normal((b, kvh, sq, d)) + 0.5 * rng.standard_normal((1, 1, 1, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kvh, sq, d)), jnp.float32)
    ku, kl, ks, km = kv_quant.quantize_keys(k, g)
    vu, vl, vs, vm = kv_quant.quantize_values(v, g)
    vu, vl = kv_quant.values_token_minor(vu, g), kv_quant.values_token_minor(vl, g)
    bk_ = jnp.asarray(rng.standard_normal((b, kvh, sb, d)), dt)
    bv_ = jnp.asarray(rng.standard_normal((b, kvh, sb, d)), dt)
    lens = np.asarray(lens)
    pos = jnp.asarray(lens[:, None] + np.arange(t)[None, :], jnp.int32)
    bst = jnp.asarray(g * np.maximum(lens // g - 1, 0), jnp.int32)
    return (q, ku, kl, ks, km, vu, vl, vs, vm, bk_, bv_, pos, bst)


def check_attention(args, kw_list, first=None):
    rng = np.random.default_rng(1)
    # (b, t, kvh, r, d, g, sq, sb, lens, dtype)
    cases = [
        (1, 1, 8, 4, 128, 128, 8192, 272, [8000], jnp.bfloat16),
        (1, 8, 8, 4, 128, 128, 8192, 272, [8100], jnp.bfloat16),
        (3, 7, 2, 3, 64, 32, 1024, 90, [1000, 40, 333], jnp.bfloat16),
        (2, 8, 2, 8, 128, 64, 2048, 150, [2000, 500], jnp.float16),
        (2, 1, 1, 1, 128, 32, 512, 80, [450, 10], jnp.float32),
        (2, 5, 4, 2, 64, 256, 1024, 530, [1023, 300], jnp.bfloat16),
    ]
    if args.smoke:
        cases = [(2, 3, 2, 4, 128, 64, 512, 160, [400, 30], jnp.bfloat16),
                 (1, 1, 1, 3, 64, 32, 256, 80, [250], jnp.float32)]
    for (b, t, kvh, r, d, g, sq, sb, lens, dt) in cases[:first]:
        if over_deadline(args):
            return
        inp = quantized_case(rng, b, t, kvh, r, d, g, sq, sb, lens, dt)
        for use_lower in (False, True):
            with jax.default_matmul_precision("highest"):
                ref = hier_attention_reference(*[a.astype(jnp.float32) if a.dtype == dt else a for a in inp],
                                               group_size=g, use_lower=use_lower)
            for kw in kw_list:
                kw = dict(kw)
                if kw.get("unpack") in ("magic", "asm", "int8") and dt == jnp.float32:
                    kw["unpack"] = "auto"
                if kw.get("unpack") == "int8" and not use_lower:  # both planes only
                    kw["unpack"] = "auto"
                if kw.get("block_k") and (kw["block_k"] % g and g % kw["block_k"]):
                    kw["block_k"] = g
                base = dict(kernel="hier_attention", b=b, t=t, kvh=kvh, r=r, d=d, g=g, sq=sq, sb=sb, lens=lens,
                            dtype=jnp.dtype(dt).name, use_lower=use_lower, kw=kw)
                try:
                    y = hier_attention(*inp, group_size=g, use_lower=use_lower, **kw)
                    fro, mx = rel_errs(y, ref)
                    ok = fro < {jnp.float32: 1e-4, jnp.float16: 5e-3}.get(dt, 2e-2)  # f16: 11 mantissa bits
                    rec = dict(base, rel_fro=fro, rel_max=mx, ok=ok)
                except Exception as e:
                    rec = dict(base, error=f"{type(e).__name__}: {str(e)[:400]}", ok=False)
                RESULTS["check"].append(rec)
                log("check attn", _short(rec))


def attn_inputs(ctx, t, use_lower, *, g=128, kvh=8, r=4, d=128, sb=None):
    """Random hierarchical cache (timing only) of ctx committed tokens; T new queries."""
    sb = 2 * g + 16 if sb is None else sb
    key = jax.random.PRNGKey(ctx + t)
    ks = jax.random.split(key, 8)
    sq = ctx
    u8 = lambda kk, shape: jax.random.bits(kk, shape, jnp.uint8)  # noqa: E731
    kshape, vshape = (1, kvh, sq, d // 2), (1, kvh, sq // g, d // 2, g)  # values: token-minor blocks of G
    ku, vu = u8(ks[0], kshape), u8(ks[1], vshape)
    kl, vl = (u8(ks[2], kshape), u8(ks[3], vshape)) if use_lower else (ku, vu)
    kst = lambda kk, shape: (0.01 + 0.1 * jax.random.uniform(kk, shape)).astype(jnp.float16)  # noqa: E731
    k_scale, k_min = kst(ks[4], (1, kvh, sq // g, d)), -kst(ks[5], (1, kvh, sq // g, d))
    v_scale, v_min = kst(ks[6], (1, kvh, sq, 1)), -kst(ks[7], (1, kvh, sq, 1))
    buf_k = jax.random.normal(ks[0], (1, kvh, sb, d), jnp.float32).astype(jnp.bfloat16)
    buf_v = jax.random.normal(ks[1], (1, kvh, sb, d), jnp.float32).astype(jnp.bfloat16)
    q = jax.random.normal(ks[2], (1, t, kvh * r, d), jnp.float32).astype(jnp.bfloat16)
    pos = jnp.asarray(ctx + np.arange(t)[None, :], jnp.int32)
    bst = jnp.asarray([g * max(ctx // g - 1, 0)], jnp.int32)
    qlen = g * max((ctx + t) // g - 1, 0)  # largest visible quantized prefix
    qlen = min(qlen, sq)
    vis_buf = ctx + t - (g * max((ctx + 1) // g - 1, 0))
    per_tok = kvh * (d // 2 * (4 if use_lower else 2) + 4 * d // g + 4)
    nbytes = qlen * per_tok + vis_buf * kvh * d * 2 * 2
    cache = (ku, kl, k_scale, k_min, vu, vl, v_scale, v_min, buf_k, buf_v)
    return q, cache, pos, bst, nbytes


def time_attention(args, ctx, t, use_lower, kw, *, xla=True, tag="main"):
    rec = dict(ctx=ctx, t=t, use_lower=use_lower, kw=kw, tag=tag)
    try:
        q, cache, pos, bst, nbytes = attn_inputs(ctx, t, use_lower)
        rec["bytes"] = nbytes
        cbytes = sum(int(a.size * a.dtype.itemsize) for a in cache)
        sets = copies_of(cache, n_copies(nbytes, args.max_copies if cbytes < (8 << 30) else 1))

        def fn(ku, kl, ks, km, vu, vl, vs, vm, bk_, bv_):
            return hier_attention(q, ku, kl, ks, km, vu, vl, vs, vm, bk_, bv_, pos, bst, group_size=128,
                                  use_lower=use_lower, **kw)

        res = time_calls(fn, sets, reps=args.reps, main_kernel=("hier_attention", "attn_kernel", "mosaic_gpu"))
        med = res["kernel_s"]
        rec.update(time_s=med, kernel_s=res["main_s"], kernels=res["kernels"], wall_s=res["wall_s"],
                   tb_s=nbytes / med / 1e12, copies=len(sets), breakdown=res.get("breakdown"))
        del sets, cache
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        log("ERROR attention", ctx, t, use_lower, kw, rec["error"])
    if xla:
        try:
            rec.update(xla_attention(args, ctx, t))
            if "time_s" in rec:
                rec["speedup"] = rec["xla_s"] / rec["time_s"]
        except Exception as e:
            rec["xla_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return rec


_XLA_CACHE: dict = {}


def xla_attention(args, ctx, t, kvh=8, r=4, d=128):
    """Dense bf16 decode attention (einsum-softmax-einsum), cache of ctx + t tokens."""
    key = (ctx, t)
    if key in _XLA_CACHE:
        return _XLA_CACHE[key]
    s = ctx + t
    kk = jax.random.normal(jax.random.PRNGKey(3), (1, kvh, s, d), jnp.float32).astype(jnp.bfloat16)
    vv = jax.random.normal(jax.random.PRNGKey(4), (1, kvh, s, d), jnp.float32).astype(jnp.bfloat16)
    q = jax.random.normal(jax.random.PRNGKey(5), (1, t, kvh * r, d), jnp.float32).astype(jnp.bfloat16)
    pos = jnp.asarray(ctx + np.arange(t)[None, :], jnp.int32)
    nbytes = 2 * s * kvh * d * 2

    def fn(k_, v_):
        qr = q.reshape(1, t, kvh, r, d)
        sc = jnp.einsum("btkrd,bksd->bkrts", qr, k_, preferred_element_type=jnp.float32) * d ** -0.5
        mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]  # [B, T, S]
        sc = jnp.where(mask[:, None, None], sc, -1e30)
        p = jax.nn.softmax(sc, axis=-1).astype(jnp.bfloat16)
        o = jnp.einsum("bkrts,bksd->btkrd", p, v_, preferred_element_type=jnp.float32)
        return o.reshape(1, t, kvh * r, d).astype(jnp.bfloat16)

    sets = copies_of((kk, vv), n_copies(nbytes, args.max_copies))
    res = time_calls(fn, sets, reps=args.reps)
    med = res["kernel_s"]
    out = dict(xla_bytes=nbytes, xla_s=med, xla_tb_s=nbytes / med / 1e12, xla_kernels=res["kernels"],
               xla_wall_s=res["wall_s"])
    _XLA_CACHE[key] = out
    del sets, kk, vv
    return out


# ---------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------

MM_SWEEP = dict(block_n=(8, 16, 32), groups_per_step=(8, 16, 32), num_warps=(2, 4, 8), prefetch=(False, True))


def mm_sweep_configs(base):
    """{} (the baseline `base` = the --mm-* options, also timed against bf16), then every
    MM_SWEEP combination that differs from it, as full overrides."""
    import itertools

    cfgs = [{}]
    for vals in itertools.product(*MM_SWEEP.values()):
        over = dict(zip(MM_SWEEP, vals))
        if any(base.get(k) != v for k, v in over.items()):
            cfgs.append(over)
    return cfgs


def sweep(args):
    mm_cfgs = [] if args.skip_mm else mm_sweep_configs(mm_kwargs(args))
    mm_shapes = [tuple(int(v) for v in s_.split("x")) for s_ in args.sweep_mm.split(",")]
    at_cfgs = [
        {}, {"prefetch": False}, {"unpack": "cvt"}, {"block_k": 64}, {"block_k": 256}, {"num_splits": 16},
        {"num_splits": 64}, {"num_warps": 8}, {"num_stages": 1}, {"num_stages": 3},
    ]
    if args.skip_attn:
        at_cfgs = []
    ctxs = [int(v) for v in args.sweep_ctx.split(",")]
    jobs = []
    for i in range(max(len(mm_cfgs), len(at_cfgs))):  # alternate (attention runs out first)
        if i < len(mm_cfgs):
            jobs.append(("mm", mm_cfgs[i]))
        if i < len(at_cfgs):
            jobs.append(("at", at_cfgs[i]))
    if args.sweep_jobs:
        jobs = [(kind, dict(over)) for kind, over in json.loads(args.sweep_jobs)]
    for kind, over in jobs:
        if kind == "mm":
            for (m, k, n) in mm_shapes:
                if over_deadline(args):
                    return
                kw = mm_kwargs(args, over)
                rec = time_matmul(args, m, k, n, kw, bf16=not over, tag="sweep")
                rec["over"] = over
                RESULTS["sweep"].append(dict(kernel="int4_matmul", **rec))
                log(f"sweep mm {over} M={m} K={k} N={n}: " + (
                    f"{rec['int4_s'] * 1e6:.1f} us {rec['int4_tb_s']:.2f} TB/s" if "int4_s" in rec else rec.get("error")))
        else:
            roles = args.sweep_at_roles.split(",")
            for (ctx, t, lower) in ([(c, 1, False) for c in ctxs] if "draft" in roles else []) + (
                    [(c, int(t), True) for t in args.sweep_verify_t.split(",") for c in ctxs]
                    if "verify" in roles else []):
                if over_deadline(args):
                    return
                kw = at_kwargs(args, over)
                rec = time_attention(args, ctx, t, lower, kw, xla=False, tag="sweep")
                rec["over"] = over
                RESULTS["sweep"].append(dict(kernel="hier_attention", **rec))
                log(f"sweep attn {over} ctx={ctx} T={t} lower={lower}: " + (
                    f"{rec['time_s'] * 1e6:.1f} us {rec['tb_s']:.2f} TB/s" if "time_s" in rec else rec.get("error")))


# ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-docs", action="store_true", help="also write docs/bench_kernels.json")
    ap.add_argument("--sweep", action="store_true", help="small block-size sweep (after the checks)")
    ap.add_argument("--fused", action="store_true", help="check and time the INT4 GEMV's fused forms")
    ap.add_argument("--only-fused", action="store_true", help="--fused, and skip the other checks and tables")
    ap.add_argument("--qkv-cache", action="store_true",
                    help="only the draft's projection fused with qkv_to_cache against the two kernels (checked, timed)")
    ap.add_argument("--smoke", action="store_true", help="tiny checks in interpret mode (runs on CPU)")
    ap.add_argument("--dry-run", action="store_true", help="tiny timings in interpret mode (CPU test of the script)")
    ap.add_argument("--mm-shapes", default=",".join(f"{k}x{n}" for k, n in MM_SHAPES), help="KxN,KxN,...")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-main", action="store_true", help="no main timing table (e.g. sweep only)")
    ap.add_argument("--skip-mm", action="store_true")
    ap.add_argument("--skip-attn", action="store_true")
    ap.add_argument("--check-variants", action="store_true",
                    help="also check other block sizes / prefetch / split-K variants (first two cases)")
    ap.add_argument("--contexts", default="8192,32768,65536,131072,262144")
    ap.add_argument("--mm-m", default="1,4,8")
    ap.add_argument("--sweep-mm", default="1x4096x28672,1x14336x4096,1x4096x6144", help="MxKxN,... (G=128)")
    ap.add_argument("--sweep-ctx", default="32768,131072")
    ap.add_argument("--sweep-jobs", default="", help='JSON [["mm"|"at", {overrides}], ...] instead of the built-in list')
    ap.add_argument("--sweep-at-roles", default="draft,verify",
                    help="attention roles the sweep times: draft (T=1, upper plane), verify (T=8, both planes)")
    ap.add_argument("--sweep-verify-t", default="8", help="query tokens of the verify sweep (T = gamma + 1), T,T,...")
    ap.add_argument("--check-jobs", default="",
                    help='JSON [["mm"|"at", {overrides}], ...]: also check these variants on every case')
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-copies", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="stop checks/timings after this many seconds (checks are compile bound: ~10 s each on GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also sum device kernel durations from the JAX profiler (needs CUPTI kernel events; "
                         "on the H100 box of 2026-11-25 only memcpy events came back)")
    ap.add_argument("--calls-per-jit", type=int, default=4,
                    help="calls per executable (each call site compiles its own Triton kernel)")
    ap.add_argument("--attn-first", action="store_true", help="time attention before the matmul")
    ap.add_argument("--mm-block-n", type=int, default=None, help="default: the path's (int4_matmul.resolve_path)")
    ap.add_argument("--mm-groups-per-step", type=int, default=None, help="default: the path's")
    ap.add_argument("--mm-warps", type=int, default=4)
    ap.add_argument("--mm-stages", type=int, default=1)
    ap.add_argument("--mm-split-k", type=int, default=None, help="default: auto")
    ap.add_argument("--mm-prefetch", action="store_true", help="int4_matmul(prefetch=True); default: the library's choice")
    ap.add_argument("--at-block-k", type=int, default=None)
    ap.add_argument("--at-block-kb", type=int, default=64)
    ap.add_argument("--at-splits", type=int, default=None)
    ap.add_argument("--at-warps", type=int, default=4)
    ap.add_argument("--at-stages", type=int, default=None)
    ap.add_argument("--at-unpack", default="auto")
    ap.add_argument("--at-history", default="triton", choices=["triton", "mosaic"],
                    help="hier_attention's history kernel for the attention tables (mosaic: sm_90, the "
                         "decoder's default there; the block options above are Triton's)")
    args = ap.parse_args()
    args.interpret = args.smoke or args.dry_run
    if args.only_fused or args.qkv_cache:
        args.fused = args.skip_check = args.skip_main = True
    global PROFILE, CALLS_PER_JIT
    PROFILE = args.profile
    CALLS_PER_JIT = args.calls_per_jit
    mm_shapes = [tuple(int(v) for v in s_.split("x")) for s_ in args.mm_shapes.split(",")]

    dev = jax.devices()[0]
    RESULTS["meta"] = dict(device=str(dev), device_kind=getattr(dev, "device_kind", "?"), jax=jax.__version__,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           argv=sys.argv[1:])
    log("device:", RESULTS["meta"]["device_kind"], "jax", jax.__version__, RESULTS["meta"]["date"])
    if args.smoke or args.dry_run:
        args.reps, args.max_copies = 1, 2

    # (a) checks
    if not args.skip_check:
        mmv = [mm_kwargs(args)]
        atv = [at_kwargs(args)]
        if not args.skip_mm:
            check_matmul(args, mmv)
        if not args.skip_attn:
            check_attention(args, atv)
        if args.check_variants:  # other code paths, on the first two cases
            mmv = [mm_kwargs(args, o) for o in ({"prefetch": not args.mm_prefetch},
                                                 {"block_n": 8, "groups_per_step": 16, "split_k": 3},
                                                 {"block_n": 32, "groups_per_step": 4, "num_warps": 8,
                                                  "prefetch": True},
                                                 {"split_k": 1, "num_warps": 2})]
            atv = [at_kwargs(args, o) for o in ({"unpack": "cvt"}, {"block_k": 256, "num_splits": 3},
                                                 {"block_k": 32, "unpack": "cvt", "prefetch": False})]
            if not args.skip_mm:
                check_matmul(args, mmv, first=2)
            if not args.skip_attn:
                check_attention(args, atv, first=2)
        if args.check_jobs:
            jobs = json.loads(args.check_jobs)
            mmv = [mm_kwargs(args, o) for kind, o in jobs if kind == "mm"]
            atv = [at_kwargs(args, o) for kind, o in jobs if kind == "at"]
            if mmv and not args.skip_mm:
                check_matmul(args, mmv)
            if atv and not args.skip_attn:
                check_attention(args, atv)
        dump(args)
    if args.smoke:
        bad = [c for c in RESULTS["check"] if not c.get("ok")]
        log(f"smoke: {len(RESULTS['check'])} checks, {len(bad)} failed")
        dump(args)
        return 1 if bad else 0

    # (b) timings
    measure_copy(args)
    dump(args)
    def run_mm():
        if not args.skip_mm and not args.skip_main:
            for m in [int(v) for v in args.mm_m.split(",")]:
                for (k, n) in mm_shapes:
                    if over_deadline(args):
                        break
                    rec = time_matmul(args, m, k, n, mm_kwargs(args))
                    RESULTS["matmul"].append(rec)
                    log(f"matmul M={m} K={k} N={n}: int4 {rec.get('int4_s', float('nan')) * 1e6:.1f} us "
                        f"({rec.get('int4_tb_s', float('nan')):.2f} TB/s) bf16 {rec['bf16_s'] * 1e6:.1f} us "
                        f"({rec['bf16_tb_s']:.2f} TB/s) speedup {rec.get('speedup', float('nan')):.2f}x")
                    dump(args)

    def run_at():
        if not args.skip_attn and not args.skip_main:
            for ctx in [int(v) for v in args.contexts.split(",")]:
                for (t, lower) in [(1, False), (8, True)]:
                    if over_deadline(args):
                        break
                    rec = time_attention(args, ctx, t, lower, at_kwargs(args))
                    RESULTS["attention"].append(rec)
                    log(f"attention ctx={ctx} T={t} lower={lower}: {rec.get('time_s', float('nan')) * 1e6:.1f} us "
                        f"({rec.get('tb_s', float('nan')):.2f} TB/s) xla {rec.get('xla_s', float('nan')) * 1e6:.1f} us "
                        f"({rec.get('xla_tb_s', float('nan')):.2f} TB/s) speedup {rec.get('speedup', float('nan')):.2f}x")
                    dump(args)
    for job in ((run_at, run_mm) if args.attn_first else (run_mm, run_at)):
        job()
    if args.qkv_cache:
        qkv_cache_op(args)
    elif args.fused:
        fused_ops(args)
    if args.sweep:
        sweep(args)
        dump(args)

    # table
    cp = RESULTS["copy"].get("tb_s", float("nan"))
    log("\n=== summary ({}, {}; copy ceiling {:.2f} TB/s r+w) ===".format(
        RESULTS["meta"]["device_kind"], RESULTS["meta"]["date"], cp))
    bad = [c for c in RESULTS["check"] if not c.get("ok")]
    log(f"checks: {len(RESULTS['check'])} run, {len(bad)} failed; worst rel_fro "
        f"{max([c.get('rel_fro', 0) for c in RESULTS['check']] or [0]):.2e}")
    for c in bad[:10]:
        log("  FAILED:", {k: v for k, v in c.items() if k in ("kernel", "m", "k", "n", "t", "d", "g", "dtype", "kw",
                                                                  "rel_fro", "error")})
    nan = float("nan")
    if PROFILE:
        log("times: device kernel time per call (us), all kernels of the call; [main kernel alone]; k = kernels/call")
    else:
        log(f"times: wall-clock per call (us): executables of {CALLS_PER_JIT} calls dispatched back to back over "
            "rotating copies (includes launch gaps; host dispatch may dominate small calls)")
    log(f"{'matmul M,K,N':>20} {'int4 us':>8} {'[main]':>8} {'k':>3} {'TB/s':>5} {'bf16 us':>8} {'TB/s':>5} {'speedup':>7}")
    for r in RESULTS["matmul"]:
        log(f"{r['m']:>3},{r['k']:>6},{r['n']:>6}     {r.get('int4_s', nan) * 1e6:8.1f} "
            f"{(r.get('int4_kernel_s') or nan) * 1e6:8.1f} {r.get('int4_kernels') or 0:3.0f} "
            f"{r.get('int4_tb_s', nan):5.2f} {r['bf16_s'] * 1e6:8.1f} {r['bf16_tb_s']:5.2f} "
            f"{r.get('speedup', nan):7.2f}")
    log(f"{'attention ctx,T':>20} {'ours us':>8} {'[main]':>8} {'k':>3} {'TB/s':>5} {'xla us':>8} {'TB/s':>5} {'speedup':>7}")
    for r in RESULTS["attention"]:
        log(f"{r['ctx']:>10},{r['t']:>2},{'int8' if r['use_lower'] else 'int4'}  "
            f"{r.get('time_s', nan) * 1e6:8.1f} {(r.get('kernel_s') or nan) * 1e6:8.1f} {r.get('kernels') or 0:3.0f} "
            f"{r.get('tb_s', nan):5.2f} {r.get('xla_s', nan) * 1e6:8.1f} {r.get('xla_tb_s', nan):5.2f} "
            f"{r.get('speedup', nan):7.2f}")
    if RESULTS["fused"]:
        log(f"{'fused GEMV (M, op)':>26} {'fused us':>9} {'k':>3} {'unfused us':>10} {'k':>3} {'TB/s':>5} {'rel_fro':>8}")
        for r in RESULTS["fused"]:
            if "fused_s" not in r:
                log(f"{r['m']:>3} {r['op']:>22} ERROR {r.get('error', '')[:80]}")
                continue
            log(f"{r['m']:>3} {r['op']:>22} {r['fused_s'] * 1e6:9.1f} {r['fused_kernels'] or 0:3.0f} "
                f"{r['unfused_s'] * 1e6:10.1f} {r['unfused_kernels'] or 0:3.0f} "
                f"{r['int4_bytes'] / r['fused_s'] / 1e12:5.2f} {r.get('rel_fro', r.get('q_rel_fro', nan)):8.1e}")
    if RESULTS["sweep"]:
        log("sweep (us per call; TB/s):")
        for r in RESULTS["sweep"]:
            if r["kernel"] == "int4_matmul":
                where = f"mm M={r['m']} K={r['k']} N={r['n']}"
                val = (f"{r['int4_s'] * 1e6:8.1f} {r['int4_tb_s']:5.2f}" if "int4_s" in r else r.get("error", "")[:60])
            else:
                where = f"at ctx={r['ctx']} T={r['t']}"
                val = (f"{r['time_s'] * 1e6:8.1f} {r['tb_s']:5.2f}" if "time_s" in r else r.get("error", "")[:60])
            log(f"  {where:<28} {str(r.get('over')):<40} {val}")
        best = {}
        for r in RESULTS["sweep"]:
            if r["kernel"] == "int4_matmul" and "int4_s" in r:
                key = (r["m"], r["k"], r["n"])
                if key not in best or r["int4_s"] < best[key]["int4_s"]:
                    best[key] = r
        for (m, k, n), r in best.items():
            base = [b for b in RESULTS["sweep"] if b["kernel"] == "int4_matmul" and not b.get("over")
                    and (b["m"], b["k"], b["n"]) == (m, k, n) and "int4_s" in b]
            vs = f" (baseline {base[0]['int4_s'] * 1e6:.1f} us)" if base else ""
            log(f"  best mm M={m} K={k} N={n}: {r['int4_s'] * 1e6:.1f} us {r['int4_tb_s']:.2f} TB/s "
                f"{r.get('over') or 'baseline'}{vs}")
    dump(args)
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    except Exception:
        traceback.print_exc()
        RESULTS["errors"].append(traceback.format_exc())
        rc = 2
    sys.exit(rc)
