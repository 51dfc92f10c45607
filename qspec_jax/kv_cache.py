"""Full-precision KV cache: per-layer K and V buffers with a static capacity.

Separate per-layer K and V arrays (not one stacked array): on the H100 this layout, donated
through the decode loop, ran at 2.3-2.4 TB/s where a stacked [L, 2, ...] cache ran at
0.96 TB/s (docs/design.md). Writes are per-row dynamic updates at absolute positions.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from qspec_jax.attention import causal_prefill_attention, masked_attention
from qspec_jax.config import LlamaConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StreamingView:
    """StreamingLLM read of a full cache: `sink` first tokens plus the last `window`."""

    sink: int = 4
    window: int = 1024


def write_rows(buf, new, start):
    """buf [B, KVH, S, D] <- new [B, KVH, T, D] at per-row offsets start [B]."""
    if buf.shape[0] == 1:  # one row: a plain in-place update, no scatter
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, start[0], 0))
    return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (0, s, 0)))(
        buf, new.astype(buf.dtype), start)


def per_query(fn, q, *args):
    """Apply fn(q[:, t:t+1], *args_t) one query at a time (exact_rows mode).

    args are arrays whose axis 1 is the query axis, or None/arrays shared by all queries
    passed through `shared`.
    """
    t = q.shape[1]

    def one(i):
        sl = [jax.lax.dynamic_slice_in_dim(a, i, 1, axis=1) for a in args]
        return fn(jax.lax.dynamic_slice_in_dim(q, i, 1, axis=1), *sl)[:, 0]

    out = jax.lax.map(one, jnp.arange(t))  # [T, B, ...]
    return jnp.moveaxis(out, 0, 1)


@flax.struct.dataclass
class KVCache:
    """Full-precision KV cache (a pytree): per layer K and V [B, KV heads, S, head_dim] in the
    cache dtype, and lengths int32 [B] (committed tokens per row). Build it with
    `CacheSpec(capacity, "fp", dtype).init(config, batch)` or `init_cache`."""

    k: tuple[Array, ...]  # per layer [B, KVH, S, D]
    v: tuple[Array, ...]
    lengths: Array  # [B] int32, committed tokens per row

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in self.k + self.v))

    def with_prompt_lengths(self, lengths) -> "KVCache":
        """Set the lengths a following prefill forward fills the cache up to."""
        return self.replace(lengths=lengths.astype(jnp.int32))

    def commit(self, lengths) -> "KVCache":
        """Declare the first lengths[b] tokens of row b final (rollback = a smaller length)."""
        return self.replace(lengths=lengths.astype(jnp.int32))

    def takes_qkv(self, opts) -> bool:
        """Whether a decode step hands this cache the un-roped projections (`HierCache.attend_qkv`)."""
        return False

    def attend(self, layer, q, k, v, positions, *, prefill, view=None, opts):
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if prefill:
            out = causal_prefill_attention(q, k, v, block=opts.prefill_block)
            start = jnp.zeros_like(positions[:, 0])
        else:
            start = positions[:, 0]
        ck = write_rows(self.k[layer], kt, start)
        cv = write_rows(self.v[layer], vt, start)
        if not prefill:
            if isinstance(view, StreamingView):
                out = _streaming_attention(q, ck, cv, positions, view, opts)
            else:
                s = jnp.arange(ck.shape[2])
                mask = s[None, None, :] <= positions[:, :, None]
                out = _attend(q, ck, cv, mask, opts)
        new = self.replace(k=_set(self.k, layer, ck), v=_set(self.v, layer, cv))
        return out, new


def _attend(q, ck, cv, mask, opts):
    if opts.exact_rows:
        return per_query(lambda qq, mm: masked_attention(qq, ck, cv, mm), q, mask)
    return masked_attention(q, ck, cv, mask)


def _streaming_attention(q, ck, cv, positions, view: StreamingView, opts):
    """Read only the sink tokens and a recent window (plus the new tokens): bytes ~ window."""
    t = q.shape[1]
    span = view.window + t - 1  # the window of the first new token, through the last one
    first = positions[:, 0]
    start = jnp.clip(first - view.window + 1, view.sink, None)
    start = jnp.minimum(start, ck.shape[2] - span)
    take = jax.vmap(lambda c, s: jax.lax.dynamic_slice_in_dim(c, s, span, axis=1))
    wk, wv = take(ck, start), take(cv, start)
    keys = jnp.concatenate([ck[:, :, : view.sink], wk], axis=2)
    vals = jnp.concatenate([cv[:, :, : view.sink], wv], axis=2)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(view.sink), (ck.shape[0], view.sink)),
                           start[:, None] + jnp.arange(span)], axis=1)  # [B, sink+span]
    p = positions[:, :, None]
    kp = pos[:, None, :]
    in_window = (kp > p - view.window) & (kp >= view.sink)
    mask = (kp <= p) & ((kp < view.sink) | in_window)
    return _attend(q, keys, vals, mask, opts)


def _set(tup, i, val):
    return tup[:i] + (val,) + tup[i + 1:]


CAPACITY_ALIGN = 1024  # the PV dot pads S to a multiple of 256 otherwise


def init_cache(config: LlamaConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> KVCache:
    """Empty fp cache of at least `capacity` tokens per row: K and V [B, KVH, S, D] per layer.

    From 1024 tokens up, S is capacity rounded up to a multiple of CAPACITY_ALIGN (small
    caches, as in tests, stay exact): with an unaligned S the GPU
    dot of the attention pads (copies) the whole K cache of every layer at every step
    (the PV dot wants S % 256 == 0; measured on an H100: 5.9 of 20.3 ms per step at
    128K, Llama-3.1-8B shape).
    """
    if capacity >= 1024:
        capacity = -(-capacity // CAPACITY_ALIGN) * CAPACITY_ALIGN
    shape = (batch, config.num_kv_heads, capacity, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))
