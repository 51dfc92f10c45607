"""Attention of new tokens over the hierarchical quantized KV cache plus its buffer.

One layer's cache (see `qspec_jax.hier_cache`):
  k_upper, k_lower  uint8 [B, KVH, Sq, D/2]   key planes (channel j low nibble, j+D/2 high)
  k_scale, k_min    f16   [B, KVH, Sq/G, D]   per channel, per group of G tokens
  v_upper, v_lower  uint8 [B, KVH, Sq/G, D/2, G] value planes in blocks of G tokens, token-minor
                                              (`kv_quant.values_token_minor`; same nibble split)
  v_scale, v_min    f16   [B, KVH, Sq, D/Gv]  per token, per group of Gv channels
  buf_k, buf_v      [B, KVH, Sb, D]           full precision, slot i = position buf_start+i

The view of a query depends on its position p alone, which is what makes speculative
decoding lossless against autoregressive decoding over the same cache: with n = p + 1,
  Q(n) = G * max(0, n // G - 1)
tokens [0, Q) are read from the quantized planes and tokens [Q, p] from the buffer.
`use_lower=False` is the draft (upper plane only), True the target (INT8).
"""

from __future__ import annotations

import functools as _functools

import jax as _jax
import jax.numpy as jnp
from jax import lax as _lax
from jax.experimental import pallas as _pl

from pallas_kernels.nibbles import CENTER, CENTER8, MAGIC16, int8_codes_f16, nibbles16, ptx_available
from pallas_kernels.qkv_to_cache import query_rows, query_rows_count
from qspec_jax import kv_quant

try:  # Pallas-Triton is deprecated in jax 0.11 but present; only needed on GPU.
    from jax.experimental.pallas import triton as _plgpu
except Exception:  # pragma: no cover
    _plgpu = None

NEG_INF = -1e30


def quantized_prefix(positions, group_size: int):
    """Q(p + 1): how many leading tokens a query at position p reads from the planes."""
    n = positions + 1
    return group_size * jnp.maximum(n // group_size - 1, 0)


def hier_attention_reference(q, k_upper, k_lower, k_scale, k_min, v_upper, v_lower, v_scale,
                             v_min, buf_k, buf_v, positions, buf_start, *, group_size: int,
                             use_lower: bool, sm_scale: float | None = None):
    """q [B, T, H, D], positions [B, T] int32, buf_start [B] int32 -> [B, T, H, D] (q.dtype)."""
    b, t, h, d = q.shape
    kvh, sq = k_upper.shape[1], k_upper.shape[2]
    sb = buf_k.shape[2]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    kl = k_lower if use_lower else None
    vl = v_lower if use_lower else None
    kq = kv_quant.dequantize_keys(k_upper, kl, k_scale, k_min, group_size)  # [B,KVH,Sq,D]
    vq = kv_quant.dequantize_values(kv_quant.values_token_major(v_upper),
                                    None if vl is None else kv_quant.values_token_major(vl), v_scale, v_min)
    qf = q.astype(jnp.float32).reshape(b, t, kvh, h // kvh, d) * sm_scale
    s_q = jnp.einsum("btkgd,bksd->bkgts", qf, kq)
    s_b = jnp.einsum("btkgd,bksd->bkgts", qf, buf_k.astype(jnp.float32))
    qlen = quantized_prefix(positions, group_size)  # [B, T]
    j = jnp.arange(sq)
    mask_q = j[None, None, :] < qlen[:, :, None]  # [B, T, Sq]
    abs_pos = buf_start[:, None] + jnp.arange(sb)[None, :]  # [B, Sb]
    mask_b = (abs_pos[:, None, :] >= qlen[:, :, None]) & (abs_pos[:, None, :] <= positions[:, :, None])
    s_q = jnp.where(mask_q[:, None, None], s_q, NEG_INF)
    s_b = jnp.where(mask_b[:, None, None], s_b, NEG_INF)
    m = jnp.maximum(s_q.max(-1), s_b.max(-1))[..., None]
    p_q, p_b = jnp.exp(s_q - m), jnp.exp(s_b - m)
    denom = p_q.sum(-1) + p_b.sum(-1)
    o = jnp.einsum("bkgts,bksd->bkgtd", p_q, vq) + jnp.einsum("bkgts,bksd->bkgtd", p_b, buf_v.astype(jnp.float32))
    o = o / denom[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


# --------------------------------------------------------------------------------------
# Pallas kernel (Pallas-Triton lowering)
# --------------------------------------------------------------------------------------
#
# Grid (B, KVH, S + SB). Program (b, h, s < S) takes the s-th chunk of the quantized
# history of row b visible to any of its queries, [0, Qmax_b), chunk = ceil(Qmax_b/S)
# rounded up to block_k: work is split by the row's actual length, not the capacity,
# and a program whose chunk is empty reads nothing. Programs s >= S take a slice of
# the full-precision buffer. All T queries x R query heads of KV head h are the M rows
# of the dots, so each K/V tile is unpacked once for all of them.
#
# Dequantization is moved off the tiles onto the queries and probabilities:
#   q.k  = sum_c (q_c s_c) U_c + sum_c q_c mn_c        (key stats per channel / group)
#   p.v  = sum_i (p_i sv_i) U_i + sum_i p_i mnv_i       (value stats per token / group)
# with U the 4-bit code (draft) or 16U+L on the scale s/16 and minimum mn - s/2 (INT8
# target). A tile only goes through nibble unpacking (the target, "int8": both planes' nibbles
# straight into a float16 INT8 code, centered); "magic" unpacking turns a nibble
# into a 16-bit float by bit operations (bf16 0x4300|c = 128+c); for keys the offset is
# removed through the row sums of each tile, values are centered (c - 8, exact) because
# their sums run over all tiles; the target then uses separate dots for the two planes.
# Each program writes an unnormalized partial output, its running max (log2 domain) and
# its sum; `merge_partials` (one more small kernel) combines them.
#
# Value scale/min are loaded one tile ahead (too narrow for Triton's async copies), and the
# constant terms are row sums: one per tile for keys, one running scalar per value group for
# values (added after the loop, which is why value codes are centered).
#
# Status: correct on the GPU for all tested shapes (scripts/bench_kernels.py checks). Speed
# (device time per call with the merge, Llama-3.1-8B layer, H100, session 8): draft (T=1, upper
# plane) 29.3 us at 32K, 86.7 us at 128K (1.65 TB/s); verify (T=8, both planes, int8 codes)
# 54.9 / 163.0 us. docs/benchmarks.md has the tables.

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
MAX_GQA = 8
MAX_T = 16
NUM_SMS_H100 = 132


class HierAttentionShapeError(ValueError):
    """Inputs the Pallas hierarchical attention does not take (raised before launch)."""


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _cdiv(a, b):
    return (a + b - 1) // b


def _dot(a, b, *, trans_b=False, precision=None):
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return _lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def check_hier_attention_args(q, k_upper, k_scale, k_min, v_upper, v_scale, v_min, buf_k, buf_v, positions,
                              buf_start, *, group_size, block_k, block_kb=64, num_splits=None,
                              buffer_splits=None, k_lower=None, v_lower=None, use_lower=False):
    """Raise HierAttentionShapeError for anything the kernel does not take."""
    err = HierAttentionShapeError
    if q.ndim != 4:
        raise err(f"q must be [B, T, H, D], got {q.shape}")
    b, t, h, d = q.shape
    if k_upper.ndim != 4:
        raise err(f"k_upper must be [B, KVH, Sq, D/2], got {k_upper.shape}")
    kvh, sq = k_upper.shape[1], k_upper.shape[2]
    if d not in SUPPORTED_HEAD_DIMS:
        raise err(f"head_dim {d} not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if kvh < 1 or h % kvh:
        raise err(f"{h} query heads are not a multiple of {kvh} KV heads")
    if not 1 <= h // kvh <= MAX_GQA:
        raise err(f"GQA ratio {h // kvh} outside 1..{MAX_GQA}")
    if not 1 <= t <= MAX_T:
        raise err(f"T={t} queries per row outside 1..{MAX_T}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise err(f"group_size {group_size} not supported (supported: {SUPPORTED_GROUP_SIZES})")
    if not (_is_pow2(block_k) and 16 <= block_k <= 512):
        raise err(f"block_k must be a power of 2 in [16, 512], got {block_k}")
    if block_k % group_size and group_size % block_k:
        raise err(f"block_k {block_k} and group_size {group_size}: one must divide the other")
    if not (_is_pow2(block_kb) and 16 <= block_kb <= 512):
        raise err(f"block_kb must be a power of 2 in [16, 512], got {block_kb}")
    if num_splits is not None and num_splits < 1:
        raise err(f"num_splits must be >= 1, got {num_splits}")
    if buffer_splits is not None and buffer_splits < 1:
        raise err(f"buffer_splits must be >= 1, got {buffer_splits}")
    if sq % group_size:
        raise err(f"quantized capacity {sq} is not a multiple of group_size {group_size}")
    gv = kv_quant.value_group_size(d, group_size)
    planes = [("k_upper", k_upper), ("v_upper", v_upper)]
    if use_lower:
        if k_lower is None or v_lower is None:
            raise err("use_lower=True needs k_lower and v_lower")
        planes += [("k_lower", k_lower), ("v_lower", v_lower)]
    for name, a in planes:  # keys token-major, values in token-minor blocks of G
        want = (b, kvh, sq, d // 2) if name[0] == "k" else (b, kvh, sq // group_size, d // 2, group_size)
        if a.shape != want or a.dtype != jnp.uint8:
            raise err(f"{name} must be uint8 {want}, got {a.dtype} {a.shape}")
    for name, a in (("k_scale", k_scale), ("k_min", k_min)):
        if a.shape != (b, kvh, sq // group_size, d):
            raise err(f"{name} must be {(b, kvh, sq // group_size, d)}, got {a.shape}")
    for name, a in (("v_scale", v_scale), ("v_min", v_min)):
        if a.shape != (b, kvh, sq, d // gv):
            raise err(f"{name} must be {(b, kvh, sq, d // gv)}, got {a.shape}")
    if buf_k.ndim != 4 or buf_k.shape[:2] != (b, kvh) or buf_k.shape[3] != d or buf_k.shape[2] < 1:
        raise err(f"buf_k must be [B, KVH, Sb>=1, D] = [{b}, {kvh}, Sb, {d}], got {buf_k.shape}")
    if buf_v.shape != buf_k.shape:
        raise err(f"buf_v shape {buf_v.shape} != buf_k shape {buf_k.shape}")
    if positions.shape != (b, t):
        raise err(f"positions must be [B, T] = {(b, t)}, got {positions.shape}")
    if buf_start.shape != (b,):
        raise err(f"buf_start must be [B] = {(b,)}, got {buf_start.shape}")
    for name, a in (("q", q), ("buf_k", buf_k), ("buf_v", buf_v)):
        if jnp.dtype(a.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise err(f"{name} dtype {a.dtype} not supported (float32, bfloat16, float16)")


def auto_num_splits(b: int, kvh: int, sq: int, block_k: int, rows: int) -> int:
    """Chunks of the quantized history per (row, KV head).

    Enough programs to cover the SMs about twice, but chunks of >= 512 tokens (>= 1024
    when many query rows make the partial outputs heavy) so the partials stay a few % of
    the cache bytes.
    """
    target = -(-2 * NUM_SMS_H100 // (b * kvh))
    min_chunk = 1024 if rows > 16 else 512
    cap = max(1, sq // max(min_chunk, block_k))
    return int(max(1, min(target, cap)))


def _attn_kernel(*refs, cfg):
    (d, half, g, gv, w, nch, bk, tk, nsub, bkb, sq, n_splits, b_splits, mp, mrows, cdt, use_lower, magic,
     mask_tail, prefetch, fixed_chunk, asm, int8) = cfg
    it = iter(refs)
    q_ref, qlen_ref, pos_ref, qmax_ref, bst_ref, brange_ref = (next(it) for _ in range(6))
    ku_ref = next(it)
    kl_ref = next(it) if use_lower else None
    ks_ref, km_ref, vu_ref = next(it), next(it), next(it)
    vl_ref = next(it) if use_lower else None
    vs_ref, vm_ref, bk_ref, bv_ref = next(it), next(it), next(it), next(it)
    o_ref, m_ref, l_ref = next(it), next(it), next(it)

    f32 = jnp.float32
    bi, hi_, si = _pl.program_id(0), _pl.program_id(1), _pl.program_id(2)
    prec = _lax.Precision.HIGHEST if cdt == jnp.dtype(jnp.float32) else None
    # dtype and precision of the dots over whole codes (magic is None: cvt, or int8 in float16)
    pdt, pprec = (jnp.dtype(jnp.float16), None) if int8 else (cdt, prec)
    qlen = qlen_ref[bi, :]  # [mp] int32
    pos = pos_ref[bi, :]
    qmax = qmax_ref[bi]
    bstart = bst_ref[bi]
    q_lo = q_ref[bi, hi_, :, _pl.ds(0, half)]  # [mp, half] f32, pre-scaled (log2 domain)
    q_hi = q_ref[bi, hi_, :, _pl.ds(half, half)]
    neg = jnp.float32(NEG_INF)

    # Output chunks: low byte-chunk c covers channels [c*w, c*w+w), high [half+c*w, ...).
    out_cols = [c * w for c in range(nch)] + [half + c * w for c in range(nch)]

    def unpack(p, centered=False):  # uint8 [.., ..] -> (lo, hi) in cdt
        if magic is not None:
            return nibbles16(p, cdt, asm=asm, centered=centered)
        return (p & 0xF).astype(cdt), (p >> 4).astype(cdt)

    def combined(pu, pl_):  # cvt path with lower plane: 16U + L in 0..255
        lo = ((pu & 0xF) << 4) | (pl_ & 0xF)
        hi = (pu & 0xF0) | (pl_ >> 4)
        return lo.astype(cdt), hi.astype(cdt)

    def softmax_update(sc, vis, m, l, acc, ex=()):
        sc = jnp.where(vis, sc, neg)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(sc - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = [a * alpha[:, None] for a in acc]
        ex = [e * alpha for e in ex]
        return p, m_new, l, acc, ex

    def load_rows(ref, tt, size, cols=None, ncols=None, valid=None):
        if cols is None:
            idx = (bi, hi_, _pl.ds(tt, size), slice(None))
        else:
            idx = (bi, hi_, _pl.ds(tt, size), _pl.ds(cols, ncols))
        if valid is None:
            return ref[idx]
        return _plgpu.load(ref.at[idx], mask=valid[:, None], other=0)

    def load_vcols(ref, grp, tt, size, c0, nc, valid=None):  # [nc, size] of the token-minor value block grp
        idx = (bi, hi_, grp, _pl.ds(c0, nc), _pl.ds(tt - grp * g, size))
        if valid is None:
            return ref[idx]
        return _plgpu.load(ref.at[idx], mask=valid[None, :], other=0)

    def load_tok_vec(ref, tt, size, col, valid=None):  # [size] f32 of ref[b, h, tt:tt+size, col]
        idx = (bi, hi_, _pl.ds(tt, size), jnp.asarray(col, jnp.int32))
        if valid is None:
            return ref[idx].astype(f32)
        return _plgpu.load(ref.at[idx], mask=valid, other=0).astype(f32)

    # ---- quantized history -----------------------------------------------------------
    if fixed_chunk:  # split boundaries by position: a query's tiles do not depend on the other queries
        chunk = fixed_chunk
    else:
        chunk = _cdiv(_cdiv(qmax, n_splits), bk) * bk
    start = si * chunk
    end = jnp.minimum(start + chunk, qmax)
    n_it = jnp.where(si < n_splits, _cdiv(jnp.maximum(end - start, 0), bk), 0)

    # Value groups the output chunks read; the per-token stats of a group are loaded and
    # used once per tile however many output chunks share it (all of them for D <= G).
    vgroups = sorted({col // gv for col in out_cols})
    gidx = {gr: i for i, gr in enumerate(vgroups)}

    def load_sub(tt, limit):
        """The tiles and key stats a sub-tile of tk tokens at tt needs (tokens < limit)."""
        grp = jnp.clip(tt // g, 0, sq // g - 1)
        valid = None if limit is None else sub_valid(tt, limit)
        if valid is None:
            kstats = [ref[bi, hi_, grp, _pl.ds(c0, half)] for ref in (ks_ref, km_ref) for c0 in (0, half)]
        else:
            any_ok = jnp.full((half,), tt < limit)  # a sub-tile never straddles a key group
            kstats = [_plgpu.load(ref.at[bi, hi_, grp, _pl.ds(c0, half)], mask=any_ok, other=0)
                      for ref in (ks_ref, km_ref) for c0 in (0, half)]
        ku = load_rows(ku_ref, tt, tk, valid=valid)  # [tk, half] uint8
        kl = load_rows(kl_ref, tt, tk, valid=valid) if use_lower else None
        vals = []
        for c in range(nch):
            vu = load_vcols(vu_ref, grp, tt, tk, c * w, w, valid=valid)  # [w, tk] uint8
            vl = load_vcols(vl_ref, grp, tt, tk, c * w, w, valid=valid) if use_lower else None
            vals.append((vu, vl))
        return kstats, ku, kl, vals

    def load_vstats(tt, limit):
        """Per value group, the [tk] scale and minimum of the sub-tile at tt. These 2-byte
        loads are too narrow for Triton's async copies, so the default loop issues them one
        step ahead (Nsight, H100: waiting on them was 19% of the kernel's stall samples)."""
        tt = jnp.minimum(tt, sq - tk)  # the look-ahead past the last tile reads valid memory, unused
        valid = None if limit is None else sub_valid(tt, limit)
        return [(load_tok_vec(vs_ref, tt, tk, gr, valid), load_tok_vec(vm_ref, tt, tk, gr, valid)) for gr in vgroups]

    def compute_sub(data, vst, tt, m, l, acc, ex):
        """One sub-tile. The constant parts of the dequantization (minimums, the magic
        offsets) are row sums: one reduction per tile for the keys, and per value group a
        running row scalar `ex` (rescaled like l) that is added to the outputs once, after
        the loop, instead of reductions and broadcasts per output chunk per tile."""
        (ks_lo, ks_hi, km_lo, km_hi), ku, kl, vals = data
        ks_lo, ks_hi, km_lo, km_hi = (a.astype(f32) for a in (ks_lo, ks_hi, km_lo, km_hi))
        tok = tt + jnp.arange(tk, dtype=jnp.int32)
        if use_lower:  # INT8 code 16U + L on the scale s/16 and the minimum mn - s/2
            km_lo, km_hi = km_lo - 0.5 * ks_lo, km_hi - 0.5 * ks_hi
        if int8:  # codes centered (c - 128): s/16 * c = s/16 * (c - 128) + 8 s
            km_lo, km_hi = km_lo + 8.0 * ks_lo, km_hi + 8.0 * ks_hi
        bias_el = q_lo * km_lo[None, :] + q_hi * km_hi[None, :]
        if magic is None:  # whole codes: 0..15, 16U + L (cvt) or 16U + L - 128 (int8)
            if use_lower:
                c_lo, c_hi = int8_codes_f16(ku, kl, asm=asm) if int8 else combined(ku, kl)
                ks_lo, ks_hi = ks_lo * (1.0 / 16.0), ks_hi * (1.0 / 16.0)
            else:
                c_lo, c_hi = unpack(ku)
            qs_lo = (q_lo * ks_lo[None, :]).astype(pdt)
            qs_hi = (q_hi * ks_hi[None, :]).astype(pdt)
            sc = _dot(qs_lo, c_lo, trans_b=True, precision=pprec) + _dot(qs_hi, c_hi, trans_b=True, precision=pprec)
        else:
            qs_lo = (q_lo * ks_lo[None, :]).astype(cdt)
            qs_hi = (q_hi * ks_hi[None, :]).astype(cdt)
            u_lo, u_hi = unpack(ku)
            sc = _dot(qs_lo, u_lo, trans_b=True) + _dot(qs_hi, u_hi, trans_b=True)
            bias_el = bias_el - magic[1] * (qs_lo.astype(f32) + qs_hi.astype(f32))
            if use_lower:
                l_lo, l_hi = unpack(kl)
                qs_lo16 = (q_lo * (ks_lo * (1.0 / 16.0))[None, :]).astype(cdt)
                qs_hi16 = (q_hi * (ks_hi * (1.0 / 16.0))[None, :]).astype(cdt)
                sc = sc + _dot(qs_lo16, l_lo, trans_b=True) + _dot(qs_hi16, l_hi, trans_b=True)
                bias_el = bias_el - magic[1] * (qs_lo16.astype(f32) + qs_hi16.astype(f32))
        sc = sc + jnp.sum(bias_el, axis=1)[:, None]
        vis = tok[None, :] < qlen[:, None]
        p, m, l, acc, ex = softmax_update(sc, vis, m, l, acc, ex)
        pvs = []  # per value group: the probabilities on the scale(s) the dots take
        ex = list(ex)
        for gi, (sv, mv) in enumerate(vst):
            if use_lower:
                mv = mv - 0.5 * sv
            if magic is None:
                pv = (p * (sv * (1.0 / 16.0) if use_lower else sv)[None, :]).astype(pdt)
                e = p * mv[None, :]
                if int8:  # centered codes: sv/16 * c = sv/16 * (c - 128) + 128 * sv/16
                    e = e + CENTER8 * pv.astype(f32)
                pvs.append((pv, None))
            else:  # centered value codes c - CENTER: sv * c = sv * (c - CENTER) + CENTER * sv
                pv = (p * sv[None, :]).astype(cdt)
                e = p * mv[None, :] + CENTER * pv.astype(f32)
                pv16 = None
                if use_lower:
                    pv16 = (p * (sv * (1.0 / 16.0))[None, :]).astype(cdt)
                    e = e + CENTER * pv16.astype(f32)
                pvs.append((pv, pv16))
            ex[gi] = ex[gi] + jnp.sum(e, axis=1)
        acc = list(acc)
        for c in range(nch):
            vu, vl = vals[c]
            if magic is None:
                codes = int8_codes_f16(vu, vl, asm=asm) if int8 else combined(vu, vl) if use_lower else unpack(vu)
                lcodes = (None, None)
            else:
                codes = unpack(vu, centered=True)
                lcodes = unpack(vl, centered=True) if use_lower else (None, None)
            for side in range(2):
                oi = side * nch + c
                pv, pv16 = pvs[gidx[out_cols[oi] // gv]]
                o = _dot(pv, codes[side], trans_b=True, precision=pprec if magic is None else None)
                if pv16 is not None:
                    o = o + _dot(pv16, lcodes[side], trans_b=True)
                acc[oi] = acc[oi] + o
        return m, l, acc, ex

    def sub_valid(tt, limit):
        return (tt + jnp.arange(tk, dtype=jnp.int32)) < limit

    m0 = jnp.full((mp,), NEG_INF, f32)
    l0 = jnp.zeros((mp,), f32)
    acc0 = [jnp.zeros((mp, w), f32) for _ in range(2 * nch)]
    ex0 = [jnp.zeros((mp,), f32) for _ in vgroups]
    if prefetch:
        # Step i computes the tile loaded during step i-1; every load is masked by the
        # program's range, so the extra prefetch past the end (and idle programs) read nothing.
        def load_tile(i):
            t0 = start + i * bk
            return [(load_sub(t0 + j * tk, end), load_vstats(t0 + j * tk, end)) for j in range(nsub)]

        def qbody(i, carry):
            m, l, acc, ex, cur = carry
            nxt = load_tile(i + 1)
            t0 = start + i * bk
            for j in range(nsub):
                m, l, acc, ex = compute_sub(cur[j][0], cur[j][1], t0 + j * tk, m, l, acc, ex)
            return m, l, acc, ex, nxt

        m_, l_, acc_, ex_, _ = _lax.fori_loop(0, n_it, qbody, (m0, l0, acc0, ex0, load_tile(0)))
    else:
        lim = qmax if mask_tail else None

        def qbody(i, carry):
            m, l, acc, ex, vst = carry
            t0 = start + i * bk
            data = [load_sub(t0 + j * tk, lim) for j in range(nsub)]
            vst_next = [load_vstats(t0 + bk + j * tk, lim) for j in range(nsub)]
            for j in range(nsub):
                m, l, acc, ex = compute_sub(data[j], vst[j], t0 + j * tk, m, l, acc, ex)
            return m, l, acc, ex, vst_next

        vst0 = [load_vstats(start + j * tk, lim) for j in range(nsub)]
        m_, l_, acc_, ex_, _ = _lax.fori_loop(0, n_it, qbody, (m0, l0, acc0, ex0, vst0))
    acc_ = [a + ex_[gidx[col // gv]][:, None] for a, col in zip(acc_, out_cols)]
    carry = (m_, l_, acc_)

    # ---- full-precision buffer ---------------------------------------------------------
    # Only the slots some query can see: [min Q - buf_start, max p - buf_start].
    blo = brange_ref[bi, 0]
    bhi = brange_ref[bi, 1]
    if fixed_chunk:  # one program, tiles at multiples of bkb (bkb divides G, so of buf_start too)
        blo = (blo // bkb) * bkb
    b_chunk = _cdiv(_cdiv(jnp.maximum(bhi - blo, 0), b_splits), bkb) * bkb
    b_begin = blo + (si - n_splits) * b_chunk
    b_end = jnp.minimum(b_begin + b_chunk, bhi)
    nb_it = jnp.where(si >= n_splits, _cdiv(jnp.maximum(b_end - b_begin, 0), bkb), 0)
    qc = q_ref[bi, hi_, :, :].astype(cdt)  # [mp, d]

    def bbody(i, carry):
        m, l, acc = carry
        t0 = b_begin + i * bkb
        idx = t0 + jnp.arange(bkb, dtype=jnp.int32)
        inb = idx < b_end
        kb = _plgpu.load(bk_ref.at[bi, hi_, _pl.ds(t0, bkb), :], mask=inb[:, None], other=0).astype(cdt)
        sc = _dot(qc, kb, trans_b=True, precision=prec)  # [mp, bkb]
        ap = bstart + idx
        vis = inb[None, :] & (ap[None, :] >= qlen[:, None]) & (ap[None, :] <= pos[:, None])
        p, m, l, acc, _ = softmax_update(sc, vis, m, l, acc)
        pc = p.astype(cdt)
        acc = list(acc)
        for oi, col in enumerate(out_cols):
            vb = _plgpu.load(bv_ref.at[bi, hi_, _pl.ds(t0, bkb), _pl.ds(col, w)], mask=inb[:, None],
                             other=0).astype(cdt)
            acc[oi] = acc[oi] + _dot(pc, vb, precision=prec)
        return m, l, acc

    m, l, acc = _lax.fori_loop(0, nb_it, bbody, carry)

    # ---- partial outputs ---------------------------------------------------------------
    rows = _pl.ds(0, mp)
    rmask = jnp.arange(mp, dtype=jnp.int32) < mrows
    for oi, col in enumerate(out_cols):
        _plgpu.store(o_ref.at[bi, hi_, si, rows, _pl.ds(col, w)], acc[oi], mask=rmask[:, None])
    _plgpu.store(m_ref.at[bi, hi_, si, rows], m, mask=rmask)
    _plgpu.store(l_ref.at[bi, hi_, si, rows], l, mask=rmask)


def resolve_defaults(block_k, num_stages):
    """block_k / num_stages where the caller left them None (the same for both roles)."""
    if block_k is None:
        block_k = 128  # verify too, since the values are token-minor (H100, session 7: 242.6 -> 208.1 us, 128K, T = 8)
    if num_stages is None:
        num_stages = 3
    return block_k, num_stages


@_functools.partial(_jax.jit, static_argnames=(
    "group_size", "use_lower", "sm_scale", "block_k", "block_kb", "num_splits", "buffer_splits", "num_warps",
    "num_stages", "unpack", "prefetch", "fixed_splits", "merge", "history", "mosaic_splits", "l2_prefetch_bytes",
    "interpret"))
def hier_attention(q, k_upper, k_lower, k_scale, k_min, v_upper, v_lower, v_scale, v_min, buf_k, buf_v,
                   positions, buf_start, *, group_size: int, use_lower: bool, sm_scale: float | None = None,
                   block_k: int | None = None, block_kb: int = 64, num_splits: int | None = None,
                   buffer_splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                   unpack: str = "auto", prefetch: bool | None = None, fixed_splits: bool = False,
                   merge: str = "pallas", q_rows=None, history: str = "triton", mosaic_splits: int = 33,
                   l2_prefetch=(), l2_prefetch_bytes: int | None = None, interpret: bool = False):
    """Pallas flash-decoding over the hierarchical cache; same contract as the reference.

    q [B, T, H, D] (T <= 16, H/KVH <= 8, D in {64, 128}), positions [B, T], buf_start [B].
    block_k: quantized tokens per loop step (power of 2; divides G or is a multiple of
    it). block_kb: buffer tokens per step. num_splits: programs per (row, KV head) over
    the quantized history (None: `auto_num_splits`). buffer_splits: programs over the
    buffer. unpack: "magic" / "asm" (magic through inline PTX, `pallas_kernels.nibbles`; with
    use_lower one dot per plane) / "cvt" / "int8" (use_lower only: the INT8 code 16U + L of both
    planes as a float16 `code - 128` by bit operations, `nibbles.int8_codes_f16`, one dot per
    tile in float16) / "auto" ("asm" for the draft and "int8" for the target with bf16/f16
    queries, "cvt" for float32). prefetch:
    load tile i+1 before computing tile i (software pipelining by hand, two tiles live
    in registers). None means the per-role default measured best on the H100
    (scripts/bench_kernels.py sweep, 2026-11-25, docs/benchmarks.md):
      draft  (use_lower=False): block_k 128, num_stages 3, asm unpack (H200, session 5), no prefetch
      target (use_lower=True):  block_k 128, num_stages 3 (H100, session 7, token-minor values),
                                int8 unpack (H100, session 8: T = 4 41.1 vs 55.7 us at 32K, 111.5
                                vs 169.6 us at 128K against cvt; magic/asm need twice the dots),
                                no prefetch
    fixed_splits: split the history by position instead of by the rows' lengths: chunks of
      capacity / num_splits tokens (num_splits None: max(1024, capacity / 128) tokens, so a
      row much shorter than the capacity still keeps the SMs busy) and one buffer program
      with tiles at multiples of min(block_kb, G). A query's reduction order then depends
      on its position alone, and a tile masked for it adds exact zeros: with the same T
      (pad the queries) a query gets bitwise the same output whatever the other queries
      are (the exact mode of `ForwardOptions.fixed_rows`).
    q_rows: the queries already as the kernel's rows, f32 [B, KVH, rows, D] scaled by sm_scale *
      log2(e) (`pallas_kernels.qkv_to_cache`, which also ropes them); q then gives only shapes
      and the output dtype. With history="mosaic" also f16 [B, KVH, 2, rows, D/2]
      (`qkv_to_cache(q_layout="mosaic")`).
    merge: how the splits' partial outputs are combined: "pallas" (`merge_partials`, one kernel
      that also writes q.dtype in the [B, T, H, D] layout) or "xla" (max, then the weighted sums).
    history: "triton" (this kernel) or "mosaic" (sm_90 GPUs; T * R <= 32, D = G = 128, either view:
      `pallas_kernels.mgpu_attention` reads the history in mosaic_splits - 1 programs and the
      buffer in one more (33: 32 + 1, one wave of the H100's 2 programs per SM at 8 KV heads), and
      `merge_partials` takes its partials; H100 sessions 11-12).
    l2_prefetch: with history="mosaic", arrays the next kernels read, prefetched into the L2 cache
      by the Mosaic programs, in order, up to l2_prefetch_bytes (`mgpu_attention.attention_partials`);
      ignored by the Triton path.
    """
    if merge not in ("pallas", "xla"):
        raise HierAttentionShapeError(f"merge must be 'pallas' or 'xla', got {merge!r}")
    if history not in ("triton", "mosaic"):
        raise HierAttentionShapeError(f"history must be 'triton' or 'mosaic', got {history!r}")
    mosaic_rows = q.shape[1] * (q.shape[2] // max(1, k_upper.shape[1]))
    if history == "mosaic" and (mosaic_rows > 32 or q.shape[3] != 128 or group_size != 128 or merge != "pallas"
                                or fixed_splits or mosaic_splits < 2):
        raise HierAttentionShapeError(
            "history='mosaic' takes T * R <= 32 query rows per KV head, head_dim = group_size = 128, merge='pallas', "
            f"no fixed_splits, mosaic_splits >= 2 (got T * R = {mosaic_rows}, D={q.shape[3]}, G={group_size}, "
            f"merge={merge!r}, fixed_splits={fixed_splits}, {mosaic_splits})")
    block_k, num_stages = resolve_defaults(block_k, num_stages)
    check_hier_attention_args(q, k_upper, k_scale, k_min, v_upper, v_scale, v_min, buf_k, buf_v, positions,
                              buf_start, group_size=group_size, block_k=block_k, block_kb=block_kb,
                              num_splits=num_splits, buffer_splits=buffer_splits, k_lower=k_lower,
                              v_lower=v_lower, use_lower=use_lower)
    b, t, h, d = q.shape
    kvh, sq = k_upper.shape[1], k_upper.shape[2]
    sb = buf_k.shape[2]
    r = h // kvh
    half = d // 2
    g = group_size
    gv = kv_quant.value_group_size(d, g)
    w = min(gv, half)
    nch = half // w
    mrows = t * r
    mp = query_rows_count(t, r)
    cdt = jnp.dtype(q.dtype) if jnp.dtype(q.dtype) in MAGIC16 else jnp.dtype(jnp.float32)
    if unpack == "auto" and use_lower:  # INT8 codes by bit operations into float16 (H100, session 8)
        unpack = "int8" if cdt in MAGIC16 else "cvt"
    elif unpack == "auto":  # magic bits through inline PTX (H200, session 5: 112 vs 128 us at 128K)
        unpack = "cvt" if cdt not in MAGIC16 else "asm" if interpret or ptx_available() else "magic"
    if unpack not in ("magic", "asm", "cvt", "int8") or (unpack in ("magic", "asm") and cdt not in MAGIC16):
        raise HierAttentionShapeError(f"unpack={unpack!r} not possible for q dtype {q.dtype}")
    if unpack == "int8" and not use_lower:
        raise HierAttentionShapeError("unpack='int8' reads both planes: it needs use_lower=True")
    int8 = unpack == "int8"
    magic = None if unpack in ("cvt", "int8") else MAGIC16[cdt]
    # interpret mode: the same bits through jnp
    asm = (unpack == "asm" or (int8 and ptx_available())) and not interpret
    if prefetch is None:
        prefetch = False
    tk = min(block_k, g)
    nsub = block_k // tk
    n_splits = auto_num_splits(b, kvh, sq, block_k, mrows) if num_splits is None else num_splits
    n_splits = max(1, min(n_splits, _cdiv(sq, block_k)))
    if fixed_splits:
        buffer_splits, block_kb = 1, min(block_kb, g)
        if num_splits is None:  # chunks of ~1024 tokens (<= 128 of them): a row much shorter than the
            # capacity still spreads over the SMs (measured at 32K of 128K: 4096-token chunks cost +60%)
            fixed_chunk = _cdiv(max(1024, _cdiv(sq, 128)), block_k) * block_k
        else:
            fixed_chunk = _cdiv(_cdiv(sq, n_splits), block_k) * block_k
        n_splits = _cdiv(sq, fixed_chunk)
    else:
        fixed_chunk = 0
    if buffer_splits is None:
        buffer_splits = max(1, min(4, _cdiv(sb, 256)))
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale

    # Rows (t, r) of KV head k: query head k*R + r at time t.
    if q_rows is None:
        qh = query_rows(q, kvh, sm_scale)
    elif history == "mosaic" and q_rows.shape == (b, kvh, 2, mp, d // 2) and q_rows.dtype == jnp.float16:
        qh = None  # already the Mosaic kernel's operand (qkv_to_cache(q_layout="mosaic"))
    elif q_rows.shape != (b, kvh, mp, d) or q_rows.dtype != jnp.float32:
        raise HierAttentionShapeError(f"q_rows must be float32 {(b, kvh, mp, d)}, got {q_rows.dtype} {q_rows.shape}")
    else:
        qh = q_rows
    positions = positions.astype(jnp.int32)
    qlen = jnp.minimum(quantized_prefix(positions, g), sq)  # [B, T]
    bst = buf_start.astype(jnp.int32)

    if history == "mosaic":  # the Mosaic kernel takes the history and the buffer; one merge kernel
        from pallas_kernels.mgpu_attention import attention_partials, mosaic_query_rows

        bdt = buf_k.dtype if buf_k.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        q16 = q_rows if q_rows is not None and q_rows.dtype == jnp.float16 else mosaic_query_rows(qh)
        second = attention_partials(
            q16, k_upper, k_scale, k_min, v_upper, v_scale, v_min, qlen, k_lower=k_lower if use_lower else None,
            v_lower=v_lower if use_lower else None, q_per_token=r,
            buffer=(buf_k.astype(bdt), buf_v.astype(bdt), bst, positions), num_splits=mosaic_splits,
            l2_prefetch=tuple(l2_prefetch), l2_prefetch_bytes=l2_prefetch_bytes, interpret=interpret)
        return merge_partials(None, None, None, total=0, t=t, r=r, out_dtype=q.dtype, second=second,
                              second_splits=mosaic_splits, interpret=interpret)
    # the Triton programs' per-row bounds
    qlen_rows = jnp.pad(jnp.repeat(qlen, r, axis=1), ((0, 0), (0, mp - mrows)))
    pos_rows = jnp.pad(jnp.repeat(positions, r, axis=1), ((0, 0), (0, mp - mrows)), constant_values=-1)
    qmax = jnp.max(qlen, axis=1)
    brange = jnp.stack([jnp.clip(jnp.min(qlen, axis=1) - bst, 0, sb),
                        jnp.clip(jnp.max(positions, axis=1) - bst + 1, 0, sb)], axis=1)
    cfg = (d, half, g, gv, w, nch, block_k, tk, nsub, block_kb, sq, n_splits, buffer_splits, mp, mrows, cdt,
           use_lower, magic, block_k > g, prefetch, fixed_chunk, asm, int8)
    args = [qh, qlen_rows, pos_rows, qmax, bst, brange, k_upper] + ([k_lower] if use_lower else []) + [
        k_scale, k_min, v_upper] + ([v_lower] if use_lower else []) + [v_scale, v_min, buf_k, buf_v]
    total = n_splits + buffer_splits
    # Partials padded to the merge kernel's blocks (pow2 splits; a last token's padded rows): the
    # slots no program writes are never read unmasked.
    s_alloc, rows_alloc = _next_pow2(total), max(mp, (t - 1) * r + _next_pow2(r))
    if merge == "xla":
        s_alloc, rows_alloc = total, mrows
    out_shape = [
        _jax.ShapeDtypeStruct((b, kvh, s_alloc, rows_alloc, d), jnp.float32),
        _jax.ShapeDtypeStruct((b, kvh, s_alloc, rows_alloc), jnp.float32),
        _jax.ShapeDtypeStruct((b, kvh, s_alloc, rows_alloc), jnp.float32),
    ]
    params = None if interpret else _plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    o, m, l = _pl.pallas_call(
        _functools.partial(_attn_kernel, cfg=cfg),
        grid=(b, kvh, total),
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="hier_attention",
    )(*args)
    if merge == "pallas":
        return merge_partials(o, m, l, total=total, t=t, r=r, out_dtype=q.dtype, interpret=interpret)
    # LSE merge of the partials (log2 domain) in XLA: three fusions.
    m_all = jnp.max(m, axis=2, keepdims=True)
    wgt = jnp.exp2(m - m_all)
    den = jnp.sum(wgt * l, axis=2)
    num = jnp.sum(wgt[..., None] * o, axis=2)
    out = num / jnp.where(den > 0, den, 1.0)[..., None]  # [B, KVH, T*R, D]
    out = out.reshape(b, kvh, t, r, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
    return out.astype(q.dtype)


def _merge_kernel(*refs, total, s_pad, sc, r, r_pad, dblk, total2=0, s2_pad=0):
    """Program (b, KV head, token, channel block): that token's R query heads. The maximum over
    all splits first (m is small), then the weighted sums over chunks of sc splits."""
    it = iter(refs)  # (o, m, l if total), (o2, m2, l2 if total2), out
    o_ref, m_ref, l_ref = (next(it) for _ in range(3)) if total else (None,) * 3
    o2_ref, m2_ref, l2_ref = (next(it) for _ in range(3)) if total2 else (None,) * 3
    out_ref = next(it)
    bi, hi, ti, di = (_pl.program_id(i) for i in range(4))
    f32 = jnp.float32
    rows = _pl.ds(ti * r, r_pad)
    cols = _pl.ds(di * dblk, dblk)
    rmask = jnp.arange(r_pad, dtype=jnp.int32) < r

    def stats(ref, s0, n, other):
        ok = ((s0 + jnp.arange(n, dtype=jnp.int32)) < total)[:, None] & rmask[None, :]
        return _plgpu.load(ref.at[bi, hi, _pl.ds(s0, n), rows], mask=ok, other=other)  # [n, r_pad]

    def chunk(s0):  # a chunk of sc splits: maxima, sums, outputs (masked: m = NEG_INF, l = o = 0)
        ok = ((s0 + jnp.arange(sc, dtype=jnp.int32)) < total)[:, None, None] & rmask[None, :, None]
        o = _plgpu.load(o_ref.at[bi, hi, _pl.ds(s0, sc), rows, cols], mask=ok, other=0.0)  # [sc, r_pad, dblk]
        return m_all if sc == s_pad else stats(m_ref, s0, sc, NEG_INF), stats(l_ref, s0, sc, 0.0), o

    m_top = jnp.full((r_pad,), NEG_INF, f32)
    if total:
        m_all = stats(m_ref, 0, s_pad, NEG_INF)  # [s_pad, r_pad]
        first = chunk(0)  # issued before the maximum (a cross-warp reduction) waits on m: one latency, not two
        m_top = jnp.max(m_all, axis=0)  # [r_pad]
    if total2:  # the second set: partials transposed, o2 [.., D, rows] (pallas_kernels.mgpu_attention)
        ok2 = (jnp.arange(s2_pad, dtype=jnp.int32) < total2)[:, None] & rmask[None, :]
        m2 = _plgpu.load(m2_ref.at[bi, hi, :, rows], mask=ok2, other=NEG_INF)  # [total2, r_pad]
        l2 = _plgpu.load(l2_ref.at[bi, hi, :, rows], mask=ok2, other=0.0)
        o2 = _plgpu.load(o2_ref.at[bi, hi, :, cols, rows], mask=ok2[:, None, :], other=0.0)  # [total2, dblk, r_pad]
        m_top = jnp.maximum(m_top, jnp.max(m2, axis=0))
    den = jnp.zeros((r_pad,), f32)
    num = jnp.zeros((r_pad, dblk), f32)
    if total2:
        wgt2 = jnp.exp2(m2 - m_top[None, :])
        den = den + jnp.sum(wgt2 * l2, axis=0)
        num = num + jnp.sum(wgt2[:, None, :] * o2, axis=0).T
    for s0 in range(0, s_pad if total else 0, sc):
        mm, ll, o = first if s0 == 0 else chunk(s0)
        wgt = jnp.exp2(mm - m_top[None, :])
        den = den + jnp.sum(wgt * ll, axis=0)
        num = num + jnp.sum(wgt[:, :, None] * o, axis=0)
    out = (num / jnp.where(den > 0, den, 1.0)[:, None]).astype(out_ref.dtype)
    if r_pad == r:  # out [B, T, H, D]: query head hi * R + j
        out_ref[bi, ti, _pl.ds(hi * r, r), cols] = out
    else:  # out [B, T, KVH, r_pad, D], the caller drops the padding heads
        out_ref[bi, ti, hi, :, cols] = out


# channels per merge program: 16 (H100, session 15, Mosaic partials at 32K / 128K: the draft's
# merge 2.31 -> 2.02 us and 2.42 -> 2.11 us against 32; the verify's, T = 4, level at ~2.5; 8 is
# slower there). One value for every T, so a row's merge has the same shape in a one-token step
# and in a verify pass.
MERGE_BLOCK_D = 16


def merge_partials(o, m, l, *, total: int, t: int, r: int, out_dtype, second=None, second_splits: int | None = None,
                   interpret: bool = False):
    """The splits' partial outputs o [B, KVH, S', rows', D] (unnormalized; splits >= total and
    rows >= T * R are padding), running maxima m (log2 domain) and sums l [B, KVH, S', rows']
    -> the attention output [B, T, KVH * R, D] in out_dtype.

    One kernel instead of XLA's three fusions (max, the weights, the weighted sums, ~4.7 us per
    call on the H100) that also writes the caller's layout and dtype. Each program reads its
    rows' [S, R, 32] slice of the partials, so there are B * KVH * T * D/32 programs (session 6's
    merge kernel, one program per row and KV head, lost to XLA). A row's output depends on its
    own partials only, in a fixed order: the exact mode's row invariance holds.

    second: optional (o2, m2, l2) of more splits in the Mosaic kernel's layout, o2 f32
    [B, KVH, S2, D, rows2] (transposed; row t * R + r), m2 / l2 [B, KVH, S2, rows2] (S2 a power of 2),
    of which the first second_splits (default: all) were written; o, m, l may then be None (the
    Mosaic kernel took the buffer too)."""
    r_pad = _next_pow2(r)
    if o is None:  # the second set alone
        b, kvh, _, d, _ = second[0].shape
        s_alloc = rows_alloc = s_pad = total = 0
    else:
        b, kvh, s_alloc, rows_alloc, d = o.shape
        s_pad = _next_pow2(total)
    if o is not None and (s_alloc < s_pad or rows_alloc < (t - 1) * r + r_pad):
        raise HierAttentionShapeError(f"partials {o.shape} too small for {total} splits, T={t}, R={r}")
    dblk = min(d, MERGE_BLOCK_D)
    sc = min(max(s_pad, 1), max(1, 8192 // (r_pad * dblk)))
    shape = (b, t, kvh * r, d) if r_pad == r else (b, t, kvh, r_pad, d)
    total2, s2_pad, extra = 0, 0, ()
    if second is not None:
        o2, m2, l2 = extra = tuple(second)
        s2_pad = o2.shape[2]
        total2 = s2_pad if second_splits is None else second_splits
        if (o2.shape[:2] != (b, kvh) or o2.shape[3] != d or not _is_pow2(s2_pad) or total2 > s2_pad
                or m2.shape != l2.shape or m2.shape != (b, kvh, s2_pad, o2.shape[4])
                or o2.shape[4] < (t - 1) * r + r_pad):
            raise HierAttentionShapeError(f"second partials {o2.shape} / {m2.shape} do not fit T={t}, R={r}, D={d}")
    out = _pl.pallas_call(
        _functools.partial(_merge_kernel, total=total, s_pad=s_pad, sc=sc, r=r, r_pad=r_pad, dblk=dblk, total2=total2,
                           s2_pad=s2_pad),
        grid=(b, kvh, t, d // dblk),
        out_shape=_jax.ShapeDtypeStruct(shape, out_dtype),
        compiler_params=None if interpret else _plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="hier_attention_merge",
    )(*((o, m, l) if o is not None else ()), *extra)
    if r_pad != r:
        out = out[:, :, :, :r].reshape(b, t, kvh * r, d)
    return out


def _on_gpu() -> bool:
    try:
        return _jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover
        return False


_WARNED: set = set()


def hier_attention_auto(q, k_upper, k_lower, k_scale, k_min, v_upper, v_lower, v_scale, v_min, buf_k, buf_v,
                        positions, buf_start, *, group_size: int, use_lower: bool, sm_scale: float | None = None,
                        backend: str = "auto", interpret: bool = False, **kernel_kwargs):
    """Dispatch to the Pallas kernel or the reference.

    backend "pallas": the kernel (HierAttentionShapeError, a ValueError, if it cannot take
    the inputs); "reference": `hier_attention_reference`; "auto": the kernel on GPU (or
    with interpret=True) when the inputs are supported, else the reference (warning once
    with the reason when on GPU).
    """
    args = (q, k_upper, k_lower, k_scale, k_min, v_upper, v_lower, v_scale, v_min, buf_k, buf_v, positions,
            buf_start)
    if backend == "auto":
        try:
            check_hier_attention_args(q, k_upper, k_scale, k_min, v_upper, v_scale, v_min, buf_k, buf_v,
                                      positions, buf_start, group_size=group_size,
                                      block_k=resolve_defaults(kernel_kwargs.get("block_k"), 1)[0],
                                      block_kb=kernel_kwargs.get("block_kb", 64), k_lower=k_lower,
                                      v_lower=v_lower, use_lower=use_lower)
            reason = None
        except HierAttentionShapeError as e:
            reason = str(e)
        if reason is None and (_on_gpu() or interpret):
            backend = "pallas"
        else:
            if reason is not None and _on_gpu() and reason not in _WARNED:
                _WARNED.add(reason)
                import warnings
                warnings.warn(f"hier_attention_auto: Pallas kernel not used ({reason}); using the reference")
            backend = "reference"
    if backend == "pallas":
        return hier_attention(*args, group_size=group_size, use_lower=use_lower, sm_scale=sm_scale,
                              interpret=interpret, **kernel_kwargs)
    if backend == "reference":
        if kernel_kwargs.get("q_rows") is not None:  # the reference reads q itself: q_rows would be ignored
            raise HierAttentionShapeError("q_rows (queries prepared for the kernel) needs the Pallas kernel")
        return hier_attention_reference(*args, group_size=group_size, use_lower=use_lower, sm_scale=sm_scale)
    raise ValueError(f"unknown backend {backend!r} (auto, pallas, reference)")
