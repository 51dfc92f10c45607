#!/usr/bin/env python
"""Decode attention formulations in XLA at the Llama-3.1-8B layer shape (bf16, batch 1):
which one streams the fp KV cache fastest. Times n chained steps in a fori_loop."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qspec_jax.attention import masked_attention  # noqa: E402

H, KVH, D = 32, 8, 128
G = H // KVH


def v_current(q, k, v, pos):
    s = jnp.arange(k.shape[2])
    return masked_attention(q, k, v, s[None, None, :] <= pos[:, :, None])


def v_rows(q, k, v, pos, f32_scores=True):
    b, t = q.shape[:2]
    qr = q.reshape(b, t, KVH, G, D).transpose(0, 2, 1, 3, 4).reshape(b, KVH, t * G, D)
    kw = {"preferred_element_type": jnp.float32} if f32_scores else {}
    s = jnp.einsum("bkmd,bksd->bkms", qr, k, **kw).astype(jnp.float32) * D ** -0.5
    mask = jnp.arange(k.shape[2])[None, None, None, :] <= jnp.repeat(pos, G, axis=1)[:, None, :, None]
    s = jnp.where(mask, s, -1e30)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bkms,bksd->bkmd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return o.reshape(b, KVH, t, G, D).transpose(0, 2, 1, 3, 4).reshape(b, t, H, D).astype(q.dtype)


def v_cudnn(q, k, v, pos):
    s = k.shape[2]
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(q, kk, vv, key_value_seq_lengths=pos[:, 0] + 1, implementation="cudnn")


VARIANTS = {"current": v_current, "rows_f32": v_rows, "rows_bf16dot": lambda *a: v_rows(*a, f32_scores=False),
            "cudnn": v_cudnn}


def main():
    n = 64
    rows = []
    for S in (32768, 131072):
        key = jax.random.PRNGKey(0)
        k = jax.random.normal(key, (1, KVH, S, D), jnp.bfloat16)
        v = jax.random.normal(key, (1, KVH, S, D), jnp.bfloat16)
        q = jax.random.normal(key, (1, 1, H, D), jnp.bfloat16)
        pos = jnp.full((1, 1), S - 1, jnp.int32)
        ref = np.asarray(v_current(q, k, v, pos), np.float32)
        for name, fn in VARIANTS.items():
            try:
                @jax.jit
                def loop(q, k, v):
                    return jax.lax.fori_loop(0, n, lambda i, q: fn(q, k, v, pos).astype(q.dtype), q)
                out = np.asarray(fn(q, k, v, pos), np.float32)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                jax.block_until_ready(loop(q, k, v))
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    jax.block_until_ready(loop(q, k, v))
                    ts.append((time.perf_counter() - t) / n)
                us = 1e6 * float(np.median(ts))
                tbps = 2 * KVH * S * D * 2 / (us * 1e-6) / 1e12
                rows.append((S, name, us, tbps, err))
                print(f"S={S} {name}: {us:.1f} us {tbps:.2f} TB/s err {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"S={S} {name}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    print("\n| S | variant | us | TB/s | rel err |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.1e} |")


if __name__ == "__main__":
    main()
