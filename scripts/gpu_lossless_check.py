#!/usr/bin/env python
"""Lossless check on the GPU: greedy QuantSpec (Pallas kernels) vs greedy autoregressive
decoding over the same INT8 hierarchical cache, random weights, several prompts.

On GPU the verify pass (gamma+1 tokens, tiled kernels) and one-token steps may round
differently, so exact equality is not guaranteed by construction as it is on CPU with
exact_rows. The check reports, per row, the first divergence and the target's top-2
logit margin there: a divergence is acceptable only at a near-tie.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qspec_jax.cache_spec import CacheSpec  # noqa: E402
from qspec_jax.config import LlamaConfig  # noqa: E402
from qspec_jax.draft import DraftRecipe, make_draft  # noqa: E402
from qspec_jax.generate import generate  # noqa: E402
from qspec_jax.model import ForwardOptions, init_random_params  # noqa: E402
from qspec_jax.speculative import speculative_generate  # noqa: E402


def main():
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=8192)
    params = init_random_params(cfg, jax.random.PRNGKey(0), jnp.dtype(dtype), scale=0.06)
    draft = make_draft(params, DraftRecipe(group_size=128))
    rng = np.random.default_rng(0)
    lengths = np.asarray([700, 333, 1000, 64], np.int32)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 1000)), jnp.int32)
    spec = CacheSpec(capacity=1024 + 640, kind="int8", dtype=dtype, group_size=128, spec_room=9)
    opts = ForwardOptions(backend="auto")
    rows = []
    t = time.time()
    ar = generate(params, cfg, toks, lengths, max_new_tokens=600, cache_spec=spec, eos_ids=(), opts=opts)
    for gamma in (1, 4, 8):
        out = speculative_generate(params, draft, cfg, toks, lengths, gamma=gamma, max_new_tokens=600,
                                   cache_spec=spec, eos_ids=(), opts=opts)
        a, s = np.asarray(ar.tokens), np.asarray(out.tokens)
        first = [int(np.argmax(a[r] != s[r])) if (a[r] != s[r]).any() else None for r in range(4)]
        rows.append({"gamma": gamma, "dtype": dtype, "identical_rows": sum(f is None for f in first),
                     "first_divergence": first, **out.stats.summary(gamma)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"# {jax.devices()[0].device_kind} {time.time() - t:.1f}s")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"lossless_{dtype}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
