#!/usr/bin/env python
"""Compile (without running) the autoregressive decode loop at a shape and write its optimized
HLO, with counts of copies and kernels in it: where the bytes beyond the byte model go."""

import functools
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qspec_jax.cache_spec import CacheSpec  # noqa: E402
from qspec_jax.model import ForwardOptions, forward, init_random_params, lm_logits  # noqa: E402
from scripts.bench_decode import SHAPES  # noqa: E402


def main():
    shape, ctx = sys.argv[1], int(sys.argv[2])
    config = SHAPES[shape]
    opts = ForwardOptions()
    params = jax.eval_shape(lambda: init_random_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
    cache = jax.eval_shape(lambda: CacheSpec(ctx, "fp", "bfloat16", spec_room=1).init(config, 1))
    tok = jax.ShapeDtypeStruct((1,), jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def ar_steps(p, cache, tok):
        def body(i, c):
            cache, tok = c
            h, cache = forward(p, config, tok[:, None], cache.lengths[:, None], cache, opts=opts)
            tok = jnp.argmax(lm_logits(p, h[:, 0], opts), -1).astype(jnp.int32)
            return cache.commit(cache.lengths + 1), tok
        return jax.lax.fori_loop(0, 8, body, (cache, tok))

    text = ar_steps.lower(params, cache, tok).compile().as_text()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"ar_{shape}_{ctx}.hlo.txt"), "w") as f:
        f.write(text)
    ops = re.findall(r"= \S+ (\w[\w-]*)\(", text)
    from collections import Counter
    c = Counter(ops)
    print(f"{shape} ctx {ctx}: " + ", ".join(f"{k} {v}" for k, v in c.most_common(25)))
    big_copies = [l.strip()[:160] for l in text.splitlines() if re.search(r"= \S+ copy\(", l) and str(ctx) in l]
    print(f"copies touching a [.., {ctx}, ..] buffer: {len(big_copies)}")
    for l in big_copies[:5]:
        print("  ", l)


if __name__ == "__main__":
    main()
