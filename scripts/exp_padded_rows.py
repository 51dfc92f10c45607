"""Experiment (not the library): is XLA's dot M-invariant when every linear pads its rows to a fixed M?
Patch model.linear: with exact_rows, pad rows to PAD (instead of one row at a time);
attention keeps exact_rows' one-query-at-a-time jnp path. PAD_ALWAYS=1 pads in every mode.
Runs another script with the patch in place (H100 runs of 2026-11-26, docs/benchmarks.md):
  PYTHONPATH=.:scripts python3 scripts/exp_padded_rows.py scripts/gpu_lossless_check.py float32 reference+exact_rows
  PAD_ALWAYS=1 PYTHONPATH=.:scripts python3 scripts/exp_padded_rows.py scripts/bench_decode.py \
      --shape llama3-8b --contexts 32768 --parts ar --steps 16 --repeats 2
"""
import dataclasses
import os
import runpy
import sys

import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
from qspec_jax import model as M  # noqa: E402

PAD = int(os.environ.get("PAD", "16"))
_orig = M.linear


def linear(x, w, opts=M.DEFAULT_OPTIONS, out_dtype=None):
    if opts.exact_rows or os.environ.get("PAD_ALWAYS"):
        one = dataclasses.replace(opts, exact_rows=False)
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        m = rows.shape[0]
        mp = -(-m // PAD) * PAD
        y = _orig(jnp.pad(rows, ((0, mp - m), (0, 0))), w, one, out_dtype)[:m]
        return y.reshape(*lead, y.shape[-1])
    return _orig(x, w, opts, out_dtype)


M.linear = linear
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
