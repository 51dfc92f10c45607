"""The Mosaic GPU attention (pallas_kernels/mgpu_attention.py) in Mosaic GPU's interpreter against
dequantize-then-attend over the cache's own layout (kv_quant): the draft's view (upper planes, one
token) and the target's (both planes, several tokens)."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mgpu_attention import (GROUP, MosaicAttentionError, attention_partials, mosaic_query_rows,
                                           supports_layer)
from qspec_jax import kv_quant

G = GROUP
N_ROWS = 16


def _cache(rng, b, kvh, sq, lower=False):
    """Random planes and statistics in the cache's layout; lower: also (k_lower, v_lower)."""
    u8 = lambda shape: jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)  # noqa: E731
    f16 = lambda lo, hi, shape: jnp.asarray(rng.uniform(lo, hi, shape), jnp.float16)  # noqa: E731
    c = (u8((b, kvh, sq, 64)), f16(0.05, 0.2, (b, kvh, sq // G, 128)), f16(-0.6, 0.6, (b, kvh, sq // G, 128)),
         u8((b, kvh, sq // G, 64, G)), f16(0.05, 0.2, (b, kvh, sq, 1)), f16(-0.6, 0.6, (b, kvh, sq, 1)))
    return (c, (u8((b, kvh, sq, 64)), u8((b, kvh, sq // G, 64, G)))) if lower else c


def _merge(o, m, l):
    """Partials o^T [B, KVH, S, D, N], m / l [B, KVH, S, N] -> [B, KVH, N, D] (float64)."""
    o, m, l = (np.asarray(a, np.float64) for a in (o, m, l))
    top = m.max(2, keepdims=True)
    w = np.exp2(m - top)
    den = (w * l).sum(2)
    num = (o * w[:, :, :, None, :]).sum(2)
    return (num / np.where(den > 0, den, 1)[:, :, None, :]).transpose(0, 1, 3, 2), den


@pytest.mark.parametrize("lower", [False, True], ids=["draft-4bit", "target-int8"])
def test_partials_match_dequantized_attention_per_row_lengths(lower):
    rng = np.random.default_rng(7)
    b, kvh, sq, rows, splits = 3, 2, 6 * G, 4, 3
    cache = _cache(rng, b, kvh, sq, lower)
    (ku, ks, km, vu, vs, vm), (kl, vl) = cache if lower else (cache, (None, None))
    qlen = jnp.asarray([[6 * G], [0], [G]], jnp.int32)  # full, empty, one group (two empty splits)
    q_rows = jnp.asarray(rng.standard_normal((b, kvh, rows, 128)) * 0.3, jnp.float32)
    q16 = mosaic_query_rows(q_rows)
    o, m, l = attention_partials(q16, ku, ks, km, vu, vs, vm, qlen, k_lower=kl, v_lower=vl, num_splits=splits,
                                 interpret=True)
    assert o.shape == (b, kvh, 4, 128, N_ROWS) and m.shape == l.shape == (b, kvh, 4, N_ROWS)  # (pow2 slots)
    o, m, l = o[:, :, :splits], m[:, :, :splits], l[:, :, :splits]
    got, den = _merge(o, m, l)

    k = np.asarray(kv_quant.dequantize_keys(ku, kl, ks, km, G), np.float64)  # [B, KVH, S, D]
    v = np.asarray(kv_quant.dequantize_values(kv_quant.values_token_major(vu),
                                              None if vl is None else kv_quant.values_token_major(vl), vs, vm),
                   np.float64)
    q = np.asarray(q16.astype(jnp.float32), np.float64).transpose(0, 1, 3, 2, 4).reshape(b, kvh, N_ROWS, 128)
    for bi, n in enumerate(np.asarray(qlen)[:, 0]):
        if n == 0:  # nothing visible: every split empty
            assert np.all(np.asarray(l[bi]) == 0) and np.all(np.asarray(o[bi]) == 0)
            assert np.all(np.asarray(m[bi]) <= -1e29)
            continue
        s = np.einsum("hnd,htd->hnt", q[bi], k[bi, :, :n])
        p = np.exp2(s - s.max(-1, keepdims=True))
        ref = np.einsum("hnt,htd->hnd", p / p.sum(-1, keepdims=True), v[bi, :, :n])[:, :rows]
        err = np.abs(got[bi, :, :rows] - ref).max() / np.abs(ref).max()
        assert err < 3e-3, (bi, err)  # f16 operands (dequantized keys / values, p)
    # the splits past a short row's groups read nothing
    assert np.all(np.asarray(l[2, :, 1:]) == 0) and np.all(np.asarray(l[2, :, 0]) > 0)


def test_query_rows_layout():
    q_rows = jnp.arange(2 * 3 * 4 * 128, dtype=jnp.float32).reshape(2, 3, 4, 128) / 1000
    q16 = np.asarray(mosaic_query_rows(q_rows), np.float32)
    assert q16.shape == (2, 3, 2, N_ROWS, 64)
    np.testing.assert_allclose(q16[:, :, 0, :4], np.asarray(q_rows)[..., :64], rtol=1e-3)
    np.testing.assert_allclose(q16[:, :, 1, :4], np.asarray(q_rows)[..., 64:], rtol=1e-3)
    assert np.all(q16[:, :, :, 4:] == 0)


def test_bad_inputs_raise_before_launch():
    rng = np.random.default_rng(0)
    cache = _cache(rng, 1, 2, 2 * G)
    q16 = jnp.zeros((1, 2, 2, N_ROWS, 64), jnp.float16)
    qlen = jnp.asarray([[G]], jnp.int32)
    with pytest.raises(MosaicAttentionError, match="group size"):
        attention_partials(q16, *cache, qlen, group_size=64, interpret=True)
    with pytest.raises(MosaicAttentionError, match="q must be"):
        attention_partials(q16.astype(jnp.float32), *cache, qlen, interpret=True)
    with pytest.raises(MosaicAttentionError, match="v_scale"):
        bad = list(cache)
        bad[4] = jnp.zeros((1, 2, 2 * G, 2), jnp.float16)  # two value groups per token: not this kernel
        attention_partials(q16, *bad, qlen, interpret=True)
    with pytest.raises(MosaicAttentionError, match="num_splits"):
        attention_partials(q16, *cache, qlen, num_splits=0, interpret=True)
    with pytest.raises(MosaicAttentionError, match="qlen must be"):
        attention_partials(q16, *cache, qlen[:, 0], interpret=True)
    with pytest.raises(MosaicAttentionError, match="together"):
        attention_partials(q16, *cache, qlen, k_lower=cache[0], interpret=True)
    with pytest.raises(MosaicAttentionError, match="q_per_token"):  # 8 tokens x 4 heads > 16 rows
        attention_partials(q16, *cache, jnp.zeros((1, 8), jnp.int32), q_per_token=4, interpret=True)


def _hier_case(rng, b, kvh, r, sq, sb, lens, dt=jnp.bfloat16, t=1):
    """A decode step's inputs over a cache quantized by kv_quant, with its buffer: row i's t new
    tokens at positions lens[i] - t .. lens[i] - 1 (their quantized prefixes may differ)."""
    d = 128
    k = jnp.asarray(rng.standard_normal((b, kvh, sq, d)) + 0.5 * rng.standard_normal((1, 1, 1, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kvh, sq, d)), jnp.float32)
    ku, kl, ks, km = kv_quant.quantize_keys(k, G)
    vu, vl, vs, vm = kv_quant.quantize_values(v, G)
    vu, vl = kv_quant.values_token_minor(vu, G), kv_quant.values_token_minor(vl, G)
    lens = np.asarray(lens)
    q = jnp.asarray(rng.standard_normal((b, t, kvh * r, d)), dt)
    buf_k, buf_v = (jnp.asarray(rng.standard_normal((b, kvh, sb, d)), dt) for _ in range(2))
    positions = lens[:, None] - t + np.arange(t)[None, :]
    first = G * np.maximum((positions[:, 0] + 1) // G - 1, 0)  # the buffer starts at the first token's prefix
    return (q, ku, kl, ks, km, vu, vl, vs, vm, buf_k, buf_v, jnp.asarray(positions, jnp.int32),
            jnp.asarray(first, jnp.int32))


def _f32(args):
    return [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]


def test_hier_attention_with_mosaic_history_matches_reference():
    """hier_attention(history="mosaic"), the draft's view: the Mosaic kernel's history and buffer
    partials, merged by one kernel, against the reference (rows of different lengths, one with an
    empty history, GQA 4)."""
    from pallas_kernels.hier_attention import hier_attention, hier_attention_reference

    rng = np.random.default_rng(11)
    # the last row has slots below its quantized prefix in the buffer (qlen - buf_start = G)
    args = _hier_case(rng, b=3, kvh=2, r=4, sq=4 * G, sb=2 * G + 16, lens=[4 * G - 3, 40, 2 * G - 1])
    ref = hier_attention_reference(*_f32(args), group_size=G, use_lower=False)
    got = hier_attention(*args, group_size=G, use_lower=False, history="mosaic", mosaic_splits=3, interpret=True)
    tri = hier_attention(*args, group_size=G, use_lower=False, interpret=True)
    ref, got, tri = (np.asarray(x, np.float32) for x in (ref, got, tri))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 2e-2, err  # bf16 output
    assert np.abs(got - ref).max() <= 2 * np.abs(tri - ref).max() + 1e-2
    # a buffer whose visible slots end past its last full 64-slot tile (the tile starts earlier
    # and masks the slots it repeats)
    args = _hier_case(rng, b=1, kvh=2, r=4, sq=2 * G, sb=152, lens=[140])
    ref = hier_attention_reference(*_f32(args), group_size=G, use_lower=False)
    got = hier_attention(*args, group_size=G, use_lower=False, history="mosaic", mosaic_splits=2, interpret=True)
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-2


@pytest.mark.parametrize("t,r", [(4, 4), (3, 8)])
def test_hier_attention_mosaic_target_view_matches_reference(t, r):
    """hier_attention(history="mosaic", use_lower=True): a verify pass of t tokens (t * r query
    rows: 16 and 24 -> a 32-row tile) over both planes. Rows whose tokens straddle a group
    boundary (different quantized prefixes per token: the last group masked for the earlier
    tokens, which read those slots from the buffer instead), a row with no history yet, and a
    last buffer tile clamped to the buffer's end."""
    from pallas_kernels.hier_attention import hier_attention, hier_attention_reference

    rng = np.random.default_rng(13 + t)
    lens = [3 * G + 2, 40, 2 * G - 1]  # tokens at 3G - 2 .. 3G + 1 cross 3G - 1 -> prefixes G and 2G
    args = _hier_case(rng, b=3, kvh=2, r=r, sq=4 * G, sb=2 * G + 8, lens=lens, t=t)
    ref = np.asarray(hier_attention_reference(*_f32(args), group_size=G, use_lower=True), np.float32)
    got = np.asarray(hier_attention(*args, group_size=G, use_lower=True, history="mosaic", mosaic_splits=3,
                                    interpret=True), np.float32)
    tri = np.asarray(hier_attention(*args, group_size=G, use_lower=True, interpret=True), np.float32)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 2e-2, err  # bf16 output
    assert np.abs(got - ref).max() <= 2 * np.abs(tri - ref).max() + 1e-2
    # the same tokens one at a time (T = 1 each) give the same outputs: the per-token masks
    for j in range(t):
        one = list(args)
        one[0], one[11] = args[0][:, j:j + 1], args[11][:, j:j + 1]
        single = np.asarray(hier_attention(*one, group_size=G, use_lower=True, history="mosaic", mosaic_splits=3,
                                           interpret=True), np.float32)
        assert np.abs(single[:, 0] - got[:, j]).max() <= 2e-2 * np.abs(ref).max(), j


def test_hier_attention_mosaic_history_rejects_other_shapes():
    from pallas_kernels.hier_attention import HierAttentionShapeError, hier_attention

    args = _hier_case(np.random.default_rng(0), b=1, kvh=2, r=4, sq=2 * G, sb=G + 16, lens=[G + 3], t=9)
    with pytest.raises(HierAttentionShapeError, match="T \\* R <= 32"):  # 9 tokens x 4 heads
        hier_attention(*args, group_size=G, use_lower=True, history="mosaic", interpret=True)
    with pytest.raises(HierAttentionShapeError, match="history must be"):
        hier_attention(*args, group_size=G, use_lower=False, history="cuda", interpret=True)


@pytest.mark.parametrize("t,r,lower", [(1, 4, False), (4, 4, True), (8, 4, True)])
def test_the_gpu_lowering_runs_on_the_cpu(t, r, lower):
    """What the GPU compiles, short of ptxas: Mosaic GPU's layout inference and lowering for sm_90
    (`lower(lowering_platforms=("cuda",))` runs on a CPU-only jaxlib), with the inline PTX, the
    buffer, the L2 prefetch of the next weights and 16 / 32 query rows; the interpreter tests
    above cover none of these GPU-only paths."""
    import jax

    sds = jax.ShapeDtypeStruct
    b, kvh, sq, n = 1, 8, 4 * G, 16 if t * r <= 16 else 32
    planes = (sds((b, kvh, sq, 64), jnp.uint8), sds((b, kvh, sq // G, 64, G), jnp.uint8))
    stats = (sds((b, kvh, sq // G, 128), jnp.float16), sds((b, kvh, sq, 1), jnp.float16))
    q16 = sds((b, kvh, 2, n, 64), jnp.float16)
    buf = (sds((b, kvh, 272, 128), jnp.bfloat16),) * 2 + (sds((b,), jnp.int32), sds((b, t), jnp.int32))
    weight = (sds((512, 32, 64), jnp.uint8), sds((512, 32), jnp.float16))  # 1 MiB + 32 KiB: whole boxes and a part

    def fn(q, ku, kst, vu, vst, qlen, buf, weight, lower_planes):
        return attention_partials(q, ku, kst, kst, vu, vst, vst, qlen, k_lower=lower_planes[0] if lower else None,
                                  v_lower=lower_planes[1] if lower else None, q_per_token=r, buffer=buf,
                                  l2_prefetch=weight, num_splits=33)
    text = jax.jit(fn).trace(q16, planes[0], stats[0], planes[1], stats[1], sds((b, t), jnp.int32), buf, weight,
                             planes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_forward_options_history_kernels_are_checked():
    from qspec_jax.model import ForwardOptions

    assert ForwardOptions(draft_history="mosaic").draft_history == "mosaic"
    assert ForwardOptions(target_history="triton").target_history == "triton"
    with pytest.raises(ValueError, match="draft_history"):
        ForwardOptions(draft_history="cuda")
    with pytest.raises(ValueError, match="target_history"):
        ForwardOptions(target_history="cuda")
    with pytest.raises(ValueError, match="l2_prefetch"):
        ForwardOptions(l2_prefetch=-1)


def test_auto_history_picks_mosaic_where_it_applies(monkeypatch):
    """ForwardOptions' "auto" on an sm_90 GPU: Mosaic for the draft's one-token steps and for the
    target's steps and verify passes of T * R <= 32 query rows outside the exact mode; Triton
    otherwise."""
    from qspec_jax import hier_cache
    from qspec_jax.config import LlamaConfig
    from qspec_jax.model import ForwardOptions

    cfg = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=64, num_layers=1, num_heads=16,
                      num_kv_heads=4, head_dim=128)
    cache = hier_cache.init_hier_cache(cfg, 1, 2 * G, spec_room=9)
    lc, auto = cache.layers[0], ForwardOptions()
    pick = lambda t, view, opts=auto: cache._history_kernel(lc, t, cfg.num_heads, view, opts)  # noqa: E731
    assert pick(1, hier_cache.DRAFT) == pick(4, hier_cache.TARGET) == "triton"  # (no sm_90 GPU here)
    monkeypatch.setattr(hier_cache, "_sm90", lambda: True)
    assert pick(1, hier_cache.DRAFT) == "mosaic"
    assert pick(4, hier_cache.DRAFT) == "triton"  # the draft's kernel is for one-token steps
    assert pick(5, hier_cache.TARGET) == pick(8, hier_cache.TARGET) == "mosaic"  # 20 and 32 query rows
    assert pick(4, hier_cache.TARGET) == pick(2, hier_cache.TARGET) == "mosaic"  # 16 and 8 rows
    assert pick(1, hier_cache.TARGET) == "mosaic"  # the target's one-token steps: the verify's kernel
    assert pick(9, hier_cache.TARGET) == "triton"  # 36 rows: past the kernel's 32
    assert pick(8, hier_cache.TARGET, ForwardOptions(fixed_rows=8)) == "triton"  # the exact mode
    assert pick(8, hier_cache.TARGET, ForwardOptions(target_history="triton")) == "triton"
    assert pick(8, hier_cache.TARGET, ForwardOptions(interpret=True)) == "triton"
    assert pick(1, hier_cache.TARGET, ForwardOptions(target_history="mosaic")) == "mosaic"


def test_qkv_to_cache_writes_the_mosaic_query_layout():
    """qkv_to_cache(q_layout="mosaic") against its reference: the same roped, scaled queries as
    the rows layout, in f16 channel halves, and the same buffer writes."""
    from pallas_kernels.qkv_to_cache import QkvToCacheError, qkv_to_cache, qkv_to_cache_reference

    rng = np.random.default_rng(5)
    b, h, kvh, d, sb = 2, 8, 2, 128, 24
    qkv = jnp.asarray(rng.standard_normal((b, 1, (h + 2 * kvh) * d)), jnp.bfloat16)
    ang = rng.uniform(0, 6, (b, 1, d // 2))
    cos = jnp.asarray(np.concatenate([np.cos(ang)] * 2, -1), jnp.float32)
    sin = jnp.asarray(np.concatenate([np.sin(ang)] * 2, -1), jnp.float32)
    buf = jnp.asarray(rng.standard_normal((b, kvh, sb, d)), jnp.bfloat16)
    slot = jnp.asarray([3, 17], jnp.int32)
    kw = dict(num_heads=h, num_kv_heads=kvh)
    q16, bk, bv = qkv_to_cache(qkv, cos, sin, buf, buf, slot, q_layout="mosaic", interpret=True, **kw)
    r16, rk, rv = qkv_to_cache_reference(qkv, cos, sin, buf, buf, slot, q_layout="mosaic", **kw)
    rows, _, _ = qkv_to_cache_reference(qkv, cos, sin, buf, buf, slot, **kw)
    assert q16.shape == (b, kvh, 2, N_ROWS, d // 2) and q16.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(q16, np.float32), np.asarray(r16, np.float32), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(np.asarray(q16, np.float32)[:, :, 0], np.asarray(rows)[..., :64], rtol=1e-2, atol=1e-3)
    assert np.all(np.asarray(q16)[:, :, :, h // kvh:] == 0)  # padded rows
    assert np.array_equal(np.asarray(bk), np.asarray(rk)) and np.array_equal(np.asarray(bv), np.asarray(rv))
    with pytest.raises(QkvToCacheError, match="q_layout"):
        qkv_to_cache(qkv, cos, sin, buf, buf, slot, q_layout="cols", interpret=True, **kw)


def test_supports_layer_follows_the_kernel_checks():
    """The decoder's "auto" choice asks the kernel's own checks: a layer it takes, and layers it
    would refuse (group size, a buffer not a multiple of 8 slots, a float32 buffer, too many
    query rows, one lower plane without the other)."""
    cache, (kl, vl) = _cache(np.random.default_rng(0), 1, 2, 2 * G, lower=True)
    buf = jnp.zeros((1, 2, 2 * G + 16, 128), jnp.bfloat16)
    assert supports_layer(*cache, buf, buf, G)
    assert not supports_layer(*cache, buf, buf, 64)
    assert not supports_layer(*cache, buf[:, :, :150], buf[:, :, :150], G)
    assert not supports_layer(*cache, buf.astype(jnp.float32), buf.astype(jnp.float32), G)
    assert supports_layer(*cache, buf, buf, G, tokens=8, q_per_token=4, k_lower=kl, v_lower=vl)
    assert not supports_layer(*cache, buf, buf, G, tokens=9, q_per_token=4, k_lower=kl, v_lower=vl)
    assert not supports_layer(*cache, buf, buf, G, tokens=4, q_per_token=4, k_lower=kl)
