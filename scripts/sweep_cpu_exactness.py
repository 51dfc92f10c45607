#!/usr/bin/env python
"""Sweep greedy speculative vs autoregressive decoding in the CPU exact mode, bitwise at the logits.

tests/test_speculative.py's setup (tiny model, G = 16, batch of 3, 100 new tokens). For each seed a
prompt set, one autoregressive run, then a speculative run per gamma. Host callbacks (added to
copies of the two loops) record the target's logits; every position that a verify pass fed with
the autoregressive prefix is compared bit for bit with the autoregressive step's logits, which is
far more sensitive than comparing tokens (before the rope and buffer-offset fixes, all of them
differed in the last bits while every token agreed; docs/design.md, "Exactness on CPU").

  PYTHONPATH=. JAX_PLATFORMS=cpu python scripts/sweep_cpu_exactness.py --seeds 6 --kinds int8,fp
Exit status 1 if any logit vector or token differs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import test_speculative as T  # noqa: E402  (its module-level setup)
from qspec_jax.cache_spec import CacheSpec  # noqa: E402

GM = importlib.import_module("qspec_jax.generate")
SM = importlib.import_module("qspec_jax.speculative")
RECORDS = []


def _record(*arrays):
    RECORDS.append([np.asarray(a) for a in arrays])


def _patched(mod, name, old, new, ns=None):
    """A copy of mod.name with `old` replaced by `new` in its source (a recording callback)."""
    src = textwrap.dedent(inspect.getsource(getattr(mod, name)))
    if old not in src:
        raise RuntimeError(f"{mod.__name__}.{name} changed: update this script ({old!r} not found)")
    ns = dict(mod.__dict__) if ns is None else ns
    ns["_record"] = _record
    exec(compile(src.replace(old, new), f"<patched {name}>", "exec"), ns)
    return ns


AR_LOGITS = "logits = lm_logits(params, hidden, opts)[:, 0]"
SPEC_LOGITS = "logits = lm_logits(target_params, hidden, opts)"
_generate = _patched(GM, "_generate", AR_LOGITS, AR_LOGITS + "; jax.debug.callback(_record, pos[:, None], "
                     "s.last[:, None], logits[:, None], ordered=True)")["_generate"]
_ns = _patched(SM, "_spec_loop", SPEC_LOGITS, SPEC_LOGITS + "; jax.debug.callback(_record, pos, feed, logits, "
               "ordered=True)")
_speculative = _patched(SM, "_speculative", "return _spec_loop(", "return _spec_loop(", _ns)["_speculative"]


def compare(toks, lens, ar_records, spec_records, ar_tokens, max_new):
    """-> (logit vectors compared, differing) over positions fed with the autoregressive prefix."""
    toks, lens = np.asarray(toks), np.asarray(lens)
    seqs = [np.concatenate([toks[r, :lens[r]], ar_tokens[r]]) for r in range(len(lens))]
    ar = {(r, int(pos[r, 0])): lg[r, 0] for pos, _, lg in ar_records for r in range(len(lens))}
    n = bad = 0
    for pos, fed, lg in spec_records:
        for r in range(len(lens)):
            for t in range(pos.shape[1]):
                p = int(pos[r, t])
                if p >= lens[r] + max_new - 1 or not np.array_equal(fed[r, :t + 1], seqs[r][pos[r, 0]:p + 1]):
                    continue
                n += 1
                bad += not np.array_equal(lg[r, t], ar[(r, p)])
    return n, bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=3000)
    ap.add_argument("--gammas", default="1,2,3,4,5,6,7")
    ap.add_argument("--kinds", default="int8,fp", help="int8 (QuantSpec) and/or fp (StreamingLLM self-speculation)")
    ap.add_argument("--opts", choices=["exact_rows", "fixed_rows"], default="exact_rows")
    a = ap.parse_args()
    opts = T.EXACT if a.opts == "exact_rows" else T.FIXED
    fp = CacheSpec(capacity=160, kind="fp", dtype="float32", spec_room=9)
    rows = tok_eq = ncmp = nbad = 0
    t0 = time.time()
    for kind in a.kinds.split(","):
        spec, draft = (T.INT8, T.DRAFT) if kind == "int8" else (fp, T.TARGET)
        method = SM.SpecMethod.quantspec() if kind == "int8" else SM.SpecMethod.streaming(window=8, sink=2)
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            rng = np.random.default_rng(seed)
            lengths = [int(rng.choice([16, 32])) if rng.random() < 0.2 else int(rng.integers(1, 41)) for _ in range(3)]
            toks, lens = T.random_prompts(rng, lengths, T.CFG.vocab_size, T.WIDTH)
            RECORDS.clear()
            ar = np.asarray(_generate(T.TARGET, toks, lens, jax.random.PRNGKey(0), config=T.CFG,
                                      max_new_tokens=T.MAX_NEW, sampling=SM.GREEDY, cache_spec=spec, eos_ids=(),
                                      opts=opts).tokens)
            jax.effects_barrier()
            ar_records = list(RECORDS)
            for gamma in (int(g) for g in a.gammas.split(",")):
                RECORDS.clear()
                sp = np.asarray(_speculative(T.TARGET, draft, toks, lens, jax.random.PRNGKey(0), config=T.CFG,
                                             gamma=gamma, max_new_tokens=T.MAX_NEW, method=method, cache_spec=spec,
                                             sampling=SM.GREEDY, eos_ids=(), opts=opts).tokens)
                jax.effects_barrier()
                n, bad = compare(toks, lens, ar_records, list(RECORDS), ar, T.MAX_NEW)
                same = [bool(np.array_equal(ar[r], sp[r])) for r in range(3)]
                rows += 3
                tok_eq += sum(same)
                ncmp += n
                nbad += bad
                print(f"{kind} seed {seed} lengths {lengths} gamma {gamma}: tokens equal {same}, "
                      f"logit vectors compared {n}, differing {bad}", flush=True)
    print(f"rows {rows}: tokens equal {tok_eq}; target logit vectors compared {ncmp}, bitwise differing {nbad} "
          f"({time.time() - t0:.0f} s)")
    return 1 if nbad or tok_eq < rows else 0


if __name__ == "__main__":
    sys.exit(main())
