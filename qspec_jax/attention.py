"""Attention math shared by the caches (plain jnp; kernels live in pallas_kernels/).

Shapes: q [B, T, H, D]; k, v [B, T or S, KVH, D] or cache layout [B, KVH, S, D].
Query heads of one KV head are folded together (GQA) instead of repeating K/V.
Softmax runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def masked_attention(q, k, v, mask, sm_scale=None):
    """q [B,T,H,D], k/v cache layout [B,KVH,S,D], mask bool [B,T,S] -> [B,T,H,D]."""
    b, t, h, d = q.shape
    kvh = k.shape[1]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    qf = q.reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bksd->bkgts", qf, k.astype(q.dtype), preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None], s * sm_scale, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


def causal_prefill_attention(q, k, v, *, block: int = 1024, use_cudnn: bool | None = None):
    """Exact causal attention of a prompt over itself, never materializing [T, T].

    q [B,T,H,D], k/v [B,T,KVH,D] (positions 0..T-1; right padding is harmless because
    the mask is causal). On GPU with bf16/f16 it uses cuDNN flash attention; elsewhere
    an online-softmax loop over key blocks (flash attention in jnp).
    """
    b, t, h, d = q.shape
    if use_cudnn is None:
        use_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    if use_cudnn:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if t <= block:
        mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
        return masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    return _blockwise_causal(q, k, v, block)


def _blockwise_causal(q, k, v, block):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    nb = -(-t // block)
    pad = nb * block - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qb = q.reshape(b, nb, block, kvh, g, d).transpose(1, 0, 3, 4, 2, 5)  # [nb,B,KVH,G,blk,D]
    kb = k.reshape(b, nb, block, kvh, d).transpose(1, 0, 3, 2, 4)  # [nb,B,KVH,blk,D]
    vb = v.reshape(b, nb, block, kvh, d).transpose(1, 0, 3, 2, 4)
    scale = d ** -0.5
    diag = jnp.tril(jnp.ones((block, block), bool))

    def q_block(i):
        qi = qb[i]

        def body(j, carry):
            m, l, acc = carry
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kb[j], preferred_element_type=jnp.float32) * scale
            s = jnp.where((j < i) | diag, s, NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j],
                                                     preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(-1), acc

        init = (jnp.full(qi.shape[:-1], NEG_INF, jnp.float32), jnp.zeros(qi.shape[:-1], jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, body, init)
        return (acc / l[..., None]).astype(q.dtype)

    out = jax.lax.map(q_block, jnp.arange(nb))  # [nb,B,KVH,G,blk,D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, h, d)
    return out[:, :t]
