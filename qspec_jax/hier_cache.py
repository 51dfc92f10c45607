"""The hierarchical KV cache shared by draft and target (QuantSpec).

Per layer: INT4 upper and lower planes of an INT8 code with float16 scales/minima
(`kv_quant`), plus a full-precision buffer of recent tokens. The draft reads the upper
plane, the target both planes; both read the buffer.

The view rule (see `pallas_kernels.hier_attention`): a query at position p reads
tokens [0, Q) from the planes and [Q, p] from the buffer, Q = G*max(0, (p+1)//G - 1).
Because the view depends on the query position alone, a verify pass over gamma+1 tokens
sees exactly what gamma+1 one-token steps would: greedy speculative decoding is lossless
against autoregressive decoding over this same cache.

Invariants after `commit(lengths)` (per row, L = committed tokens):
  planes hold every complete group [0, G*(L//G)) of final (target) K/V,
  the buffer holds positions [buf_start, L) with buf_start = G*max(0, L//G - 1), i.e.
  between G and 2G-1 committed tokens, and room for `spec_room` speculative ones.
A group is quantized when it completes (commit), and the buffer shifts by G when
buf_start moves: the paper's flush, done inside the decode loop under `lax.cond`.
Rollback after a rejection is only a smaller length.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.hier_attention import hier_attention_reference, quantized_prefix
from qspec_jax import kv_quant
from qspec_jax.attention import causal_prefill_attention
from qspec_jax.config import LlamaConfig
from qspec_jax.kv_cache import per_query, write_rows

Array = jax.Array
DRAFT, TARGET = "draft", "target"


def _sm90() -> bool:
    """A Hopper GPU (compute capability 9.x): the Mosaic GPU draft attention's wgmma / TMA."""
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")
    except Exception:  # pragma: no cover
        return False


@flax.struct.dataclass
class HierLayer:
    k_upper: Array  # uint8 [B, KVH, Sq, D/2]
    k_lower: Array  # uint8 [B, KVH, Sq, D/2]
    k_scale: Array  # f16 [B, KVH, Sq/G, D]
    k_min: Array  # f16 [B, KVH, Sq/G, D]
    v_upper: Array  # uint8 [B, KVH, Sq/G, D/2, G] (token-minor blocks: kv_quant.values_token_minor)
    v_lower: Array  # uint8 [B, KVH, Sq/G, D/2, G]
    v_scale: Array  # f16 [B, KVH, Sq, D/Gv]
    v_min: Array  # f16 [B, KVH, Sq, D/Gv]
    buf_k: Array  # [B, KVH, Sb, D] full precision
    buf_v: Array  # [B, KVH, Sb, D]


def buffer_start(lengths, group_size: int):
    return group_size * jnp.maximum(lengths // group_size - 1, 0)


def _slice_rows(x, start, size, axis):
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, axis=axis - 1))(x, start)


def _row_major(x):
    """Pin x to the row-major layout. The value planes' updates are transposed blocks ([G, D/2]
    -> [D/2, G]); left free, XLA's layout assignment made that transpose a bitcast by giving
    its operand, and back through the quantization the buffers and the key planes in the
    decode loop, a transposed layout, then copied the key planes back to row-major before
    every verify kernel (H100, session 7: two 12.8 us plane transposes per layer per round at
    32K, seen in the compiled round's HLO). Pinning the token-major block and the planes keeps
    the transpose on the small block."""
    from jax.experimental.layout import Layout, with_layout_constraint

    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def _update_rows(x, upd, start, axis):
    def one(r, u, s):
        idx = [0] * r.ndim
        idx[axis - 1] = s
        return jax.lax.dynamic_update_slice(r, u.astype(r.dtype), idx)

    return jax.vmap(one)(x, upd, start)


@flax.struct.dataclass
class HierCache:
    """The QuantSpec cache (a pytree): per layer a `HierLayer`, lengths int32 [B] committed
    tokens, group_size (static). `nbytes` counts every stored array (planes, fp16
    scales/minima, the full-precision buffer)."""

    layers: tuple[HierLayer, ...]
    lengths: Array  # int32 [B] committed tokens
    group_size: int = flax.struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.layers[0].k_upper.shape[2]

    @property
    def buffer_slots(self) -> int:
        return self.layers[0].buf_k.shape[2]

    @property
    def buf_start(self):
        return buffer_start(self.lengths, self.group_size)

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self.layers)))

    def with_prompt_lengths(self, lengths) -> "HierCache":
        """Set the lengths a following prefill forward fills the cache up to."""
        return self.replace(lengths=lengths.astype(jnp.int32))

    # -- attention -------------------------------------------------------------------

    def with_layer(self, layer, lc: HierLayer) -> "HierCache":
        """The cache with layer `layer` replaced by lc."""
        return self.replace(layers=self.layers[:layer] + (lc,) + self.layers[layer + 1:])

    @staticmethod
    def _check_view(view):
        if view not in (DRAFT, TARGET, None):
            raise ValueError(f"hierarchical cache view must be 'draft' or 'target', got {view!r}")

    def attend(self, layer, q, k, v, positions, *, prefill, view=TARGET, opts):
        self._check_view(view)
        lc = self.layers[layer]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, T, D]
        if prefill:
            out = causal_prefill_attention(q, k, v, block=opts.prefill_block)
            lc = self._fill_from_prompt(lc, kt, vt)
        else:
            bs = self.buf_start
            slot = positions[:, 0] - bs
            lc = lc.replace(buf_k=write_rows(lc.buf_k, kt, slot), buf_v=write_rows(lc.buf_v, vt, slot))
            out = self._read(lc, q, positions, bs, use_lower=view != DRAFT, opts=opts)
        return out, self.with_layer(layer, lc)

    def takes_qkv(self, opts) -> bool:
        """Whether a decode step goes through `attend_qkv` (the Pallas path, not exact_rows)."""
        return opts.use_pallas() and not opts.exact_rows

    def fuses_projection(self, tokens: int, view, x_dtype, weight, bias=None) -> bool:
        """Whether `attend_qkv` takes the draft's q / k / v projection itself (`projection=`): one
        new token per row, the INT4 kernel takes the rows and the weight, half a head is a
        multiple of its column block, a bias (if any) in x's dtype. Call only where `takes_qkv`
        holds and the weight is INT4 on the Pallas path."""
        from pallas_kernels.int4_matmul import M1_NARROW_BLOCK_N, pallas_unsupported_reason

        half = self.layers[0].buf_k.shape[3] // 2
        return (view == DRAFT and tokens == 1 and half % M1_NARROW_BLOCK_N == 0
                and pallas_unsupported_reason(self.lengths.shape[0], weight, x_dtype) is None
                and (bias is None or bias.dtype == x_dtype))

    def attend_qkv(self, layer, qkv, cos, sin, positions, *, num_heads, view=TARGET, opts, l2_prefetch=(),
                   projection=None):
        """`attend` for a decode step from the un-roped projections qkv [B, T, (H + 2 KVH) * D]
        and the rope tables: one kernel (`pallas_kernels.qkv_to_cache`) ropes q and k, writes k
        and v into the buffer and lays the queries out as the attention kernel's rows, where XLA
        made three kernels per layer (H100: ~4 us of a draft step's ~99 us per layer at 32K).
        l2_prefetch: arrays the next kernels read (the o-projection's and gate | up's INT4 arrays),
        which the Mosaic attention prefetches into the L2 cache (`ForwardOptions.l2_prefetch`).

        projection: instead of qkv (None), the draft's (x [B, 1, K], norm weight, eps, INT4 q | k |
        v weight, bias or None) where `fuses_projection` holds: the projection and this step's
        qkv_to_cache are then one kernel (`int4_matmul.int4_qkv_to_cache`)."""
        from pallas_kernels.qkv_to_cache import qkv_to_cache

        self._check_view(view)
        lc = self.layers[layer]
        b, t = positions.shape
        d = lc.buf_k.shape[3]
        bs = self.buf_start
        # the Mosaic attention takes its queries in its own layout (saves a transpose kernel)
        history = self._history_kernel(lc, t, num_heads, view, opts)
        mosaic = history == "mosaic"
        heads = dict(num_heads=num_heads, num_kv_heads=lc.buf_k.shape[1], q_layout="mosaic" if mosaic else "rows",
                     interpret=opts.interpret)
        if projection is not None:
            from pallas_kernels.int4_matmul import int4_qkv_to_cache

            x, norm_weight, eps, w, bias = projection
            q_rows, buf_k, buf_v = int4_qkv_to_cache(x.reshape(b, -1), w.packed, w.scale, w.minimum, norm_weight,
                                                     cos[:, 0], sin[:, 0], lc.buf_k, lc.buf_v, positions[:, 0] - bs,
                                                     bias, norm_eps=float(eps), **heads)
            q_shape = jnp.zeros((b, t, num_heads, d), x.dtype)  # shapes and dtype only (dead code for XLA)
        else:
            q_rows, buf_k, buf_v = qkv_to_cache(qkv, cos, sin, lc.buf_k, lc.buf_v, positions[:, 0] - bs, **heads)
            q_shape = qkv[:, :, :num_heads * d].reshape(b, t, num_heads, d)  # shapes and dtype only
        lc = lc.replace(buf_k=buf_k, buf_v=buf_v)
        out = self._read(lc, q_shape, positions, bs, use_lower=view != DRAFT, opts=opts, q_rows=q_rows,
                         history=history, l2_prefetch=l2_prefetch if mosaic else ())
        return out, self.with_layer(layer, lc)

    def _history_kernel(self, lc: HierLayer, t: int, num_heads: int, view: str, opts) -> str:
        """The kernel for the history and the buffer of a decode step on the Pallas path:
        ForwardOptions.draft_history (the draft's one-token steps) or target_history (the
        target's steps and verify passes). "auto" is "mosaic" on an sm_90 GPU for the shapes that
        kernel takes (T * R <= 32 query rows per KV head), else "triton": for the draft's
        one-token steps, and for all the target's passes outside the exact mode (its
        position-fixed splits are Triton's). H100, session 15: the target's attention 33.7 against
        35.9 us (T = 1) and 34.0 against 36.8 (T = 4) at 32K; verify pass in the decoder, gamma 3,
        6.56 / 6.59 against 6.65 / 6.62 ms at 32K. With the target's one-token steps and its verify
        passes in one kernel, whose groups go to the same programs whatever T, greedy speculation
        parts from greedy decoding later at near-ties (gamma 1: 2 of 4 rows identical over 600
        tokens against 0 of 4 with Triton's one-token steps)."""
        draft = view == DRAFT
        choice = opts.draft_history if draft else opts.target_history
        if choice == "mosaic":
            return "mosaic"
        if choice == "triton" or opts.interpret or not _sm90():
            return "triton"
        r = num_heads // lc.k_upper.shape[1]
        if (t != 1) if draft else opts.fixed_rows:
            return "triton"
        from pallas_kernels.mgpu_attention import supports_layer

        lower = {} if draft else {"k_lower": lc.k_lower, "v_lower": lc.v_lower}
        fits = supports_layer(lc.k_upper, lc.k_scale, lc.k_min, lc.v_upper, lc.v_scale, lc.v_min, lc.buf_k, lc.buf_v,
                              self.group_size, tokens=t, q_per_token=r, **lower)
        return "mosaic" if fits else "triton"

    def _read(self, lc: HierLayer, q, positions, bs, *, use_lower, opts, q_rows=None, history=None, l2_prefetch=()):
        g = self.group_size
        if opts.exact_rows:
            return per_query(self._aligned_reference(lc, bs, use_lower), q, positions)
        if opts.use_pallas():
            from pallas_kernels.hier_attention import hier_attention_auto

            if history is None:  # (attend_qkv chose it already, for its query layout)
                history = self._history_kernel(lc, q.shape[1], q.shape[2], TARGET if use_lower else DRAFT, opts)
            fn = lambda qq, pp: hier_attention_auto(  # noqa: E731
                qq, lc.k_upper, lc.k_lower, lc.k_scale, lc.k_min, lc.v_upper, lc.v_lower, lc.v_scale,
                lc.v_min, lc.buf_k, lc.buf_v, pp, bs, group_size=g, use_lower=use_lower, backend="pallas",
                fixed_splits=opts.fixed_rows > 0, q_rows=q_rows, history=history, interpret=opts.interpret,
                **({"l2_prefetch": tuple(l2_prefetch), "l2_prefetch_bytes": opts.l2_prefetch}
                   if history == "mosaic" and l2_prefetch else {}))
        else:
            fn = lambda qq, pp: hier_attention_reference(  # noqa: E731
                qq, lc.k_upper, lc.k_lower, lc.k_scale, lc.k_min, lc.v_upper, lc.v_lower, lc.v_scale,
                lc.v_min, lc.buf_k, lc.buf_v, pp, bs, group_size=g, use_lower=use_lower)
        return fn(q, positions)

    def _aligned_reference(self, lc: HierLayer, bs, use_lower):
        """The reference attention of one query [B, 1] (exact_rows), reading the buffer from the
        query's own Q(p) instead of buf_start.

        A verify pass that crosses a group boundary runs before that group's flush, so its query
        at p finds the window [Q(p), p] G slots further into the buffer than the autoregressive
        step at p does (after the flush), and the sums over buffer slots rounded differently
        (measured on CPU: a last-bit difference in layer 0's attention output). Slicing the
        buffer at Q(p) - buf_start (0..G) gives every program one layout per query position."""
        g, sb = self.group_size, self.buffer_slots
        wide = ((0, 0), (0, 0), (0, g), (0, 0))
        buf_k, buf_v = jnp.pad(lc.buf_k, wide), jnp.pad(lc.buf_v, wide)

        def fn(qq, pp):
            start = quantized_prefix(pp[:, 0], g)
            bk, bv = (_slice_rows(b, start - bs, sb, 2) for b in (buf_k, buf_v))
            return hier_attention_reference(
                qq, lc.k_upper, lc.k_lower, lc.k_scale, lc.k_min, lc.v_upper, lc.v_lower, lc.v_scale,
                lc.v_min, bk, bv, pp, start, group_size=g, use_lower=use_lower)
        return fn

    # -- filling and flushing --------------------------------------------------------

    def _fill_from_prompt(self, lc: HierLayer, kt, vt) -> HierLayer:
        """Quantize every group of the prompt and copy each row's buffer window."""
        g, sb = self.group_size, self.buffer_slots
        t = kt.shape[2]
        tp = -(-t // g) * g
        if tp > self.capacity:
            raise ValueError(f"prompt width {t} exceeds the cache length {self.capacity}")
        pad = ((0, 0), (0, 0), (0, tp - t), (0, 0))
        ku, kl, ks, km = kv_quant.quantize_keys(jnp.pad(kt, pad), g)
        vu, vl, vs, vm = kv_quant.quantize_values(jnp.pad(vt, pad), g)
        vu, vl = (kv_quant.values_token_minor(_row_major(p), g) for p in (vu, vl))
        dus = jax.lax.dynamic_update_slice

        def z(a):
            return (0,) * a.ndim
        lc = lc.replace(
            k_upper=dus(lc.k_upper, ku, z(ku)), k_lower=dus(lc.k_lower, kl, z(kl)),
            k_scale=dus(lc.k_scale, ks, z(ks)), k_min=dus(lc.k_min, km, z(km)),
            v_upper=_row_major(dus(lc.v_upper, vu, z(vu))), v_lower=_row_major(dus(lc.v_lower, vl, z(vl))),
            v_scale=dus(lc.v_scale, vs, z(vs)), v_min=dus(lc.v_min, vm, z(vm)))
        bs = self.buf_start
        wide = ((0, 0), (0, 0), (0, sb), (0, 0))
        return lc.replace(buf_k=_slice_rows(jnp.pad(kt, wide), bs, sb, 2).astype(lc.buf_k.dtype),
                          buf_v=_slice_rows(jnp.pad(vt, wide), bs, sb, 2).astype(lc.buf_v.dtype))

    def commit(self, lengths) -> "HierCache":
        """Make lengths[b] tokens final: quantize a group that completed, shift the buffer.

        A round may add at most G tokens per row (gamma + 1 <= G), so at most one group
        completes. Runs the flush under lax.cond only when some row needs it.
        """
        g = self.group_size
        old, new = self.lengths, lengths.astype(jnp.int32)
        completes = (new // g) > (old // g)
        cache = self.replace(lengths=new)

        def flush(layers):
            return tuple(self._flush_layer(lc, old, new, completes) for lc in layers)

        layers = jax.lax.cond(jnp.any(completes), flush, lambda ls: ls, self.layers)
        return cache.replace(layers=layers)

    def _flush_layer(self, lc: HierLayer, old, new, completes) -> HierLayer:
        g = self.group_size
        bs_old, bs_new = buffer_start(old, g), buffer_start(new, g)
        start = g * (old // g)  # absolute position of the completing group
        off = start - bs_old  # its buffer offset
        sb = lc.buf_k.shape[2]
        shift = (bs_new - bs_old)[:, None, None, None] > 0

        def head(buf):  # slots [0, Sb - g) after the flush: [g, Sb) where the buffer shifts (the last g
            # slots stay as they were, past the valid range either way)
            return jnp.where(shift, jax.lax.slice_in_dim(buf, g, sb, axis=2), jax.lax.slice_in_dim(buf, 0, sb - g, axis=2))
        # Every read of the buffers goes through one optimization_barrier before their in-place writes,
        # so XLA sees the reads ordered first. Without it (and with a jnp.roll for the shift) XLA
        # copied every layer's two buffers after the lax.cond in every round, flush or not.
        kg, vg, head_k, head_v = jax.lax.optimization_barrier(
            (_slice_rows(lc.buf_k, off, g, 2), _slice_rows(lc.buf_v, off, g, 2), head(lc.buf_k), head(lc.buf_v)))
        ku, kl, ks, km = kv_quant.quantize_keys(kg, g)  # kg, vg: [B, KVH, G, D]
        vu, vl, vs, vm = kv_quant.quantize_values(vg, g)
        vu, vl = (kv_quant.values_token_minor(_row_major(p), g) for p in (vu, vl))  # one block

        def put(store, upd, pos):  # along axis 2: tokens, key groups, or value blocks (5-D)
            cur = _slice_rows(store, pos, upd.shape[2], 2)
            sel = jnp.where(completes.reshape((-1,) + (1,) * (upd.ndim - 1)), upd.astype(store.dtype), cur)
            return _update_rows(store, sel, pos, 2)

        return lc.replace(
            k_upper=put(lc.k_upper, ku, start), k_lower=put(lc.k_lower, kl, start),
            k_scale=put(lc.k_scale, ks, start // g), k_min=put(lc.k_min, km, start // g),
            v_upper=_row_major(put(lc.v_upper, vu, start // g)),
            v_lower=_row_major(put(lc.v_lower, vl, start // g)),
            v_scale=put(lc.v_scale, vs, start), v_min=put(lc.v_min, vm, start),
            buf_k=jax.lax.dynamic_update_slice_in_dim(lc.buf_k, head_k, 0, axis=2),
            buf_v=jax.lax.dynamic_update_slice_in_dim(lc.buf_v, head_v, 0, axis=2))


def buffer_size(group_size: int, spec_room: int) -> int:
    """2G committed slots + room for speculative tokens, rounded up to 16."""
    return -(-(2 * group_size + spec_room) // 16) * 16


def init_hier_cache(config: LlamaConfig, batch: int, capacity: int, *, group_size: int = 128,
                    spec_room: int = 16, dtype=jnp.bfloat16) -> HierCache:
    """An empty hierarchical cache for `capacity` tokens per row (`CacheSpec(kind="int8")` builds it).

    Per layer and for K and V: uint8 upper and lower 4-bit planes [batch, kv_heads,
    capacity, head_dim/2] (values in token-minor blocks [batch, kv_heads, capacity/G, head_dim/2,
    G]), float16 scales/minima (keys per group of `group_size` tokens,
    values per token), and a full-precision buffer [batch, kv_heads, 2*group_size +
    spec_room (rounded up to 16), head_dim] in `dtype`. capacity must be a multiple of
    group_size (CacheSpec rounds it up for you).
    spec_room: tokens a single forward may add beyond the committed length (gamma + 1);
      it must not exceed group_size.
    """
    d, kvh = config.head_dim, config.num_kv_heads
    if group_size < 2 or group_size % 2:
        raise ValueError(f"KV group size must be even and >= 2, got {group_size}")
    if capacity % group_size:
        raise ValueError(f"cache length {capacity} is not a multiple of the KV group size {group_size}")
    if not 1 <= spec_room <= group_size:
        raise ValueError(f"spec_room={spec_room} must be between 1 and the KV group size {group_size}")
    gv = kv_quant.value_group_size(d, group_size)
    sb = buffer_size(group_size, spec_room)
    sq = capacity

    def z(shape, dt):
        return jnp.zeros((batch, kvh) + shape, dt)

    def layer():
        return HierLayer(
            k_upper=z((sq, d // 2), jnp.uint8), k_lower=z((sq, d // 2), jnp.uint8),
            k_scale=z((sq // group_size, d), jnp.float16), k_min=z((sq // group_size, d), jnp.float16),
            v_upper=z((sq // group_size, d // 2, group_size), jnp.uint8),
            v_lower=z((sq // group_size, d // 2, group_size), jnp.uint8),
            v_scale=z((sq, d // gv), jnp.float16), v_min=z((sq, d // gv), jnp.float16),
            buf_k=z((sb, d), dtype), buf_v=z((sb, d), dtype))

    return HierCache(layers=tuple(layer() for _ in range(config.num_layers)),
                     lengths=jnp.zeros((batch,), jnp.int32), group_size=group_size)
