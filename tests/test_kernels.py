"""Pallas kernels in interpret mode (CPU) against their `jnp` references.

Interpret mode proves numerics, not Triton's constraints: `scripts/bench_kernels.py`
checks the same kernels on the GPU. Shapes are small (interpret mode runs the grid
sequentially) and awkward: ragged K and N, a ragged last K split, lengths that are no
multiple of the block, empty quantized history, full buffer, several batch rows at
different positions.
Each distinct static configuration costs one interpret-mode compile (~3-10 s), so one
compiled kernel is reused for several position sets where possible.

Tolerances (relative Frobenius error of the output against the float32 reference on
the same inputs): float32 2e-5; float16 5e-3; bfloat16 1.5e-2 (a bf16 output rounding
alone is ~3e-3; the attention kernels also round q*scale and p*scale to bf16 for the
dots; the INT4 matmul computes in float32 and rounds only its output).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.hier_attention import (HierAttentionShapeError, hier_attention, hier_attention_auto,
                                           hier_attention_reference)
from pallas_kernels.int4_matmul import (MAX_M, Int4ShapeError, int4_fused_reference, int4_linear, int4_matmul,
                                        int4_matmul_reference, pallas_unsupported_reason, resolve_path, split_plan)
from qspec_jax import kv_quant
from qspec_jax.quant_weights import dequantize_weight, pack_weight, quantize_rtn, unpack_codes

TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.float16): 5e-3, jnp.dtype(jnp.bfloat16): 1.5e-2}


def rel_fro(y, r):
    y = np.asarray(y, np.float32)
    r = np.asarray(r, np.float32)
    return float(np.linalg.norm(y - r) / np.linalg.norm(r))


def highest(fn, *args, **kw):
    with jax.default_matmul_precision("highest"):
        return fn(*args, **kw)


# ---------------------------------------------------------------------------------------
# INT4 matmul
# ---------------------------------------------------------------------------------------

MM_CASES = [
    # m, k, n, g, dtype, kernel kwargs (path auto: "reduce" for M <= 2, "dot" for M > 2)
    pytest.param(1, 1000, 200, 128, jnp.bfloat16, dict(), id="defaults-raggedK104-raggedN"),
    pytest.param(3, 600, 37, 64, jnp.float32, dict(split_k=3, groups_per_step=2),
                 id="split3-ragged-last-split-raggedK-raggedN"),
    pytest.param(3, 600, 37, 64, jnp.float32, dict(split_k=3, groups_per_step=2, prefetch=True, path="reduce"),
                 id="reduce-M3-split3-ragged-last-split-prefetch"),
    pytest.param(1, 320, 48, 32, jnp.float32, dict(groups_per_step=4, split_k=2, prefetch=True),
                 id="G32-split2-gps8-last-split-2-groups-prefetch"),
    pytest.param(8, 512, 70, 256, jnp.float16, dict(block_n=8, prefetch=True, path="reduce"),
                 id="reduce-M8-G256-f16-prefetch"),
    pytest.param(8, 2048, 40, 128, jnp.bfloat16, dict(), id="M8-auto-split2-unmasked-groups"),
    pytest.param(3, 1024, 96, 32, jnp.bfloat16, dict(block_n=32, split_k=1, prefetch=True, path="reduce"),
                 id="reduce-M3-G32-4-steps-unmasked-prefetch"),
    pytest.param(8, 512, 70, 256, jnp.float16, dict(block_n=32), id="dot-M8-G256-f16-raggedN"),
    pytest.param(2, 1024, 96, 32, jnp.bfloat16, dict(groups_per_step=4, split_k=1, path="dot"),
                 id="dot-M2-G32-4-groups-per-step"),
    pytest.param(5, 700, 64, 128, jnp.float32, dict(split_k=2, groups_per_step=2),
                 id="dot-M5-f32-raggedK-split2-clamped-groups"),
    pytest.param(1, 300, 130, 64, jnp.bfloat16, dict(path="dot"), id="dot-M1-raggedK-raggedN"),
    pytest.param(4, 300, 130, 64, jnp.bfloat16, dict(magic=False), id="dot-M4-cvt-unpack"),
    pytest.param(1, 256, 64, 64, jnp.bfloat16, dict(block_n=4, split_k=1), id="block_n4-no-masks"),
    pytest.param(2, 1000, 200, 128, jnp.float32, dict(asm=False), id="reduce-M2-subtract-unpack-f32"),
    # bf16 / f16 on the reduce path take the packed 16-bit inner product (fma16) by default; the
    # float32 one stays selectable
    pytest.param(1, 1000, 200, 128, jnp.bfloat16, dict(fma16=False), id="reduce-M1-bf16-f32-inner-product"),
    pytest.param(2, 200, 24, 32, jnp.float16, dict(groups_per_step=2, split_k=2, prefetch=True),
                 id="fma16-M2-f16-G32-split2-prefetch-raggedK"),
]


@pytest.mark.parametrize("m,k,n,g,dtype,kw", MM_CASES)
def test_int4_matmul_matches_reference(m, k, n, g, dtype, kw):
    rng = np.random.default_rng(m * 1000 + k + n)
    qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), g)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    y = int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, interpret=True, **kw)
    assert y.shape == (m, n) and y.dtype == x.dtype
    ref = highest(int4_matmul_reference, x.astype(jnp.float32), qw.packed, qw.scale, qw.minimum, group_size=g)
    assert rel_fro(y, ref) < TOL[jnp.dtype(dtype)]


ALL_FORMS = [(norm, act, res) for norm in (False, True) for act in (None, "silu_mul") for res in (False, True)]
DECODER_FORMS = [(True, None, False), (True, "silu_mul", False), (False, None, True)]  # qkv, gate/up; o, down
FUSED_CASES = [
    # m, k, n_out, g, dtype, kernel kwargs, (norm, act, residual) combinations
    pytest.param(1, 300, 130, 64, jnp.float32, dict(), ALL_FORMS, id="M1-raggedK-raggedN"),
    pytest.param(2, 512, 96, 128, jnp.bfloat16, dict(), DECODER_FORMS, id="M2-bf16"),
    pytest.param(1, 1024, 64, 32, jnp.float32, dict(split_k=3), DECODER_FORMS, id="M1-split3-XLA-finishes"),
    pytest.param(4, 300, 130, 64, jnp.float32, dict(), DECODER_FORMS, id="M4-dot-XLA-around"),
    pytest.param(1, 640, 40, 64, jnp.float32, dict(split_k=1, groups_per_step=2, prefetch=True), DECODER_FORMS,
                 id="M1-prefetch-5-steps-ragged"),
    pytest.param(1, 1024, 48, 32, jnp.bfloat16, dict(split_k=1, groups_per_step=4), [(False, None, True)],
                 id="M1-bf16-fma16-8-steps-auto-prefetch"),  # the down projection's default form
]


@pytest.mark.parametrize("m,k,n,g,dtype,kw,forms", FUSED_CASES)
def test_int4_matmul_fused_forms_match_reference(m, k, n, g, dtype, kw, forms):
    """RMSNorm prologue, silu(gate) * up of paired columns, residual add: in the reduce
    kernel, around the dot kernel, and after a split-K sum."""
    rng = np.random.default_rng(k + n)
    for norm, act, res in forms:
        qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, 2 * n if act else n)), jnp.float32), g)
        x = jnp.asarray(2.0 * rng.standard_normal((m, k)), dtype)  # mean square 4: the norm matters
        fused = dict(norm_weight=jnp.asarray(1 + 0.3 * rng.standard_normal(k), dtype) if norm else None,
                     residual=jnp.asarray(rng.standard_normal((m, n)), dtype) if res else None, act=act)
        y = int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, interpret=True, **fused, **kw)
        assert y.shape == (m, n) and y.dtype == x.dtype
        ref = highest(int4_fused_reference, x.astype(jnp.float32), qw.packed, qw.scale, qw.minimum,
                      group_size=g, **fused)
        assert rel_fro(y, ref) < TOL[jnp.dtype(dtype)], (norm, act, res)


@pytest.mark.parametrize("m,k,n,g,dtype,kw", [
    (1, 512, 40, 128, jnp.bfloat16, dict()), (1, 1024, 64, 32, jnp.float32, dict(split_k=3)),
    (4, 300, 130, 64, jnp.float32, dict()), (1, 640, 48, 64, jnp.bfloat16, dict(act="silu_mul", split_k=1))])
def test_int4_matmul_rms_only_is_the_norm_with_a_folded_weight(m, k, n, g, dtype, kw):
    """rms_only: the RMSNorm without a weight (the weight folded into W's rows). Against the
    reference, which is the norm with a weight of ones, in the fma16, split-K and dot paths; and
    W * g quantized with rms_only is close to W with the norm weight g."""
    rng = np.random.default_rng(k + n + m)
    act = kw.get("act")
    w = jnp.asarray(rng.standard_normal((k, 2 * n if act else n)), jnp.float32)
    gw = jnp.asarray(1 + 0.3 * rng.standard_normal(k), jnp.float32)
    x = jnp.asarray(2.0 * rng.standard_normal((m, k)), dtype)
    folded = quantize_rtn(gw[:, None] * w, g)
    y = int4_matmul(x, folded.packed, folded.scale, folded.minimum, group_size=g, interpret=True, rms_only=True, **kw)
    ref = highest(int4_fused_reference, x.astype(jnp.float32), folded.packed, folded.scale, folded.minimum,
                  group_size=g, rms_only=True, act=act)
    ones = highest(int4_fused_reference, x.astype(jnp.float32), folded.packed, folded.scale, folded.minimum,
                   group_size=g, norm_weight=jnp.ones((k,), jnp.float32), act=act)
    assert rel_fro(ref, ones) < 1e-6
    assert rel_fro(y, ref) < TOL[jnp.dtype(dtype)]
    qw = quantize_rtn(w, g)  # before the activation: two INT4 roundings of the same product (~0.1 each)
    unfolded = highest(int4_fused_reference, x.astype(jnp.float32), qw.packed, qw.scale, qw.minimum, group_size=g,
                       norm_weight=gw)
    linear = highest(int4_fused_reference, x.astype(jnp.float32), folded.packed, folded.scale, folded.minimum,
                     group_size=g, rms_only=True)
    assert rel_fro(linear, unfolded) < 0.2
    with pytest.raises(Int4ShapeError, match="rms_only"):
        int4_matmul(x, folded.packed, folded.scale, folded.minimum, group_size=g, norm_weight=gw, rms_only=True)


QKV_CACHE_CASES = [
    # m, k, heads, kv heads, head_dim, g, dtype, kwargs (block_n 8: P = D / 16 programs per head)
    pytest.param(1, 300, 6, 2, 64, 64, jnp.bfloat16, dict(), id="M1-GQA3-raggedK-bf16-fma16-mosaic"),
    pytest.param(3, 256, 4, 4, 32, 32, jnp.float32, dict(q_layout="rows", bias=True),
                 id="M3-MHA-D32-f32-rows-bias-slot-past-end"),
    pytest.param(2, 512, 8, 1, 128, 128, jnp.float16, dict(bias=True, groups_per_step=2, block_n=16),
                 id="M2-GQA8-D128-f16-2-steps-bn16"),
]


@pytest.mark.parametrize("m,k,h,kvh,d,g,dtype,kw", QKV_CACHE_CASES)
def test_int4_qkv_to_cache_matches_the_unfused_composition(m, k, h, kvh, d, g, dtype, kw):
    """The draft's q / k / v GEMV with qkv_to_cache in its epilogue against the projection (RMSNorm,
    INT4, bias) followed by qkv_to_cache's reference: query rows, both buffers (slots written and
    untouched; a slot past the buffer writes nothing), the padded query rows zero."""
    from pallas_kernels.int4_matmul import int4_qkv_to_cache, int4_qkv_to_cache_reference

    kw = dict(kw)
    bias_on, q_layout = kw.pop("bias", False), kw.pop("q_layout", "mosaic")
    rng = np.random.default_rng(k + h + d)
    n = (h + 2 * kvh) * d
    qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, n)) * 0.2, jnp.float32), g)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    gw = jnp.asarray(1 + 0.3 * rng.standard_normal(k), dtype)
    bias = jnp.asarray(0.5 * rng.standard_normal(n), dtype) if bias_on else None
    ang = rng.uniform(0, 6.3, (m, d // 2))
    cos = jnp.asarray(np.cos(np.concatenate([ang, ang], 1)), jnp.float32)
    sin = jnp.asarray(np.sin(np.concatenate([ang, ang], 1)), jnp.float32)
    sb = 24
    buf_k = jnp.asarray(rng.standard_normal((m, kvh, sb, d)), dtype)
    buf_v = jnp.asarray(rng.standard_normal((m, kvh, sb, d)), dtype)
    slot = jnp.asarray([5, sb - 1, sb][:m], jnp.int32)  # the third row's token has no slot
    args = (cos, sin, buf_k, buf_v, slot, bias)
    heads = dict(num_heads=h, num_kv_heads=kvh, q_layout=q_layout)
    q, bk, bv = int4_qkv_to_cache(x, qw.packed, qw.scale, qw.minimum, gw, *args, norm_eps=1e-5, interpret=True,
                                  **heads, **kw)
    rq, rk, rv = highest(int4_qkv_to_cache_reference, x, qw, gw, 1e-5, *args, **heads)
    assert q.shape == rq.shape and q.dtype == rq.dtype and bk.dtype == buf_k.dtype
    # the kernel's projection is float32 until one rounding to x.dtype, as the reference's
    tol = {jnp.dtype(jnp.float32): 1e-5}.get(jnp.dtype(dtype), 1e-2)
    assert rel_fro(q, rq) < tol
    written = np.zeros((m, kvh, sb, d), bool)
    for r, s_ in enumerate(np.asarray(slot)):
        if s_ < sb:
            written[r, :, s_] = True
    for got, ref, old in ((bk, rk, buf_k), (bv, rv, buf_v)):
        assert rel_fro(np.asarray(got, np.float32)[written], np.asarray(ref, np.float32)[written]) < tol
        assert np.array_equal(np.asarray(got)[~written], np.asarray(old)[~written])
    r_per_kv = h // kvh
    if q_layout == "mosaic":
        assert not np.asarray(q, np.float32)[:, :, :, r_per_kv:].any()
    else:
        assert not np.asarray(q)[:, :, r_per_kv:].any()


def test_int4_qkv_to_cache_bad_inputs_raise_before_launch():
    from pallas_kernels.int4_matmul import int4_qkv_to_cache
    from pallas_kernels.qkv_to_cache import QkvToCacheError

    qw = quantize_rtn(jnp.ones((128, 8 * 32)), 64)  # 4 q + 2 kv heads of 32
    x, gw = jnp.ones((1, 128), jnp.bfloat16), jnp.ones((128,), jnp.bfloat16)
    cs, buf, slot = jnp.ones((1, 32)), jnp.zeros((1, 2, 8, 32), jnp.bfloat16), jnp.zeros((1,), jnp.int32)
    call = lambda h=4, kvh=2, c=cs, b=buf, **kw: int4_qkv_to_cache(  # noqa: E731
        x, qw.packed, qw.scale, qw.minimum, gw, c, c, b, b, slot, num_heads=h, num_kv_heads=kvh, norm_eps=1e-5,
        interpret=True, **kw)
    with pytest.raises(QkvToCacheError, match="columns"):
        call(h=5)
    with pytest.raises(QkvToCacheError, match="cos / sin"):
        call(c=jnp.ones((1, 64)))
    with pytest.raises(QkvToCacheError, match="buffers"):
        call(b=jnp.zeros((1, 3, 8, 32), jnp.bfloat16))
    with pytest.raises(QkvToCacheError, match="block_n"):
        call(block_n=32)
    with pytest.raises(QkvToCacheError, match="q_layout"):
        call(q_layout="bhsd")


def test_int4_fused_reference_is_the_unfused_composition():
    from qspec_jax.model import rms_norm

    rng = np.random.default_rng(11)
    k, n, g = 256, 48, 64
    qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, 2 * n)), jnp.float32), g)
    x = jnp.asarray(3.0 * rng.standard_normal((2, k)), jnp.float32)
    gw = jnp.asarray(1 + 0.3 * rng.standard_normal(k), jnp.float32)
    r = jnp.asarray(rng.standard_normal((2, n)), jnp.float32)
    y = highest(int4_fused_reference, x, qw.packed, qw.scale, qw.minimum, group_size=g, norm_weight=gw,
                norm_eps=1e-5, residual=r, act="silu_mul")
    gate, up = jnp.split(highest(int4_matmul_reference, rms_norm(x, gw, 1e-5), qw.packed, qw.scale, qw.minimum,
                                 group_size=g), 2, axis=-1)
    assert rel_fro(y, r + jax.nn.silu(gate) * up) < 1e-5
    with pytest.raises(Int4ShapeError, match="even"):
        int4_matmul(x, qw.packed[:-1], qw.scale[:-1], qw.minimum[:-1], group_size=g, act="silu_mul")
    with pytest.raises(Int4ShapeError, match="residual"):
        int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, residual=r)  # N = 2n without act
    with pytest.raises(Int4ShapeError, match="norm_weight"):
        int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, norm_weight=gw[:-1])
    with pytest.raises(Int4ShapeError, match="act"):
        int4_matmul(x, qw.packed, qw.scale, qw.minimum, group_size=g, act="gelu")


def _teacher_forced_logits(params, cfg, toks, n_prompt, t, view, opts, *, group_size=32, capacity=128,
                           dtype=jnp.float32):
    """Prefill n_prompt tokens into a hierarchical cache (G = 32, capacity 128 by default), then
    decode the rest of toks t at a time, teacher forced, committing after each forward: logits
    [B, steps, V]."""
    from qspec_jax.hier_cache import init_hier_cache
    from qspec_jax.model import forward, lm_logits

    b = toks.shape[0]
    cache = init_hier_cache(cfg, b, capacity, group_size=group_size, dtype=dtype)
    cache = cache.with_prompt_lengths(jnp.full((b,), n_prompt, jnp.int32))
    pos = jnp.broadcast_to(jnp.arange(n_prompt), (b, n_prompt))
    _, cache = jax.jit(lambda c, tk: forward(params, cfg, tk, pos, c, prefill=True, opts=opts))(
        cache, toks[:, :n_prompt])

    @jax.jit
    def step(c, tok, i):
        p = i + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h, c = forward(params, cfg, tok, p, c, view=view, opts=opts)
        return lm_logits(params, h, opts), c.commit(jnp.full((b,), i + t, jnp.int32))

    out = []
    for i in range(n_prompt, toks.shape[1] - t + 1, t):
        lg, cache = step(cache, toks[:, i:i + t], jnp.int32(i))
        out.append(lg)
    return np.concatenate(out, 1)


def _spy_fused_qkv(monkeypatch):
    """Count the traces of `int4_qkv_to_cache` (the draft step's projection + cache writes)."""
    from pallas_kernels import int4_matmul

    calls, real = [], int4_matmul.int4_qkv_to_cache
    monkeypatch.setattr(int4_matmul, "int4_qkv_to_cache", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def test_draft_forward_through_interpreted_kernels_matches_reference(monkeypatch):
    """The draft's decode steps with every Pallas kernel (fused INT4 GEMVs, the projection fused
    with the cache writes, draft attention) in interpret mode against the jnp reference path,
    teacher forced across KV flushes."""
    from helpers import random_prompts, tiny_config, tiny_params
    from qspec_jax.draft import DraftRecipe, make_draft
    from qspec_jax.model import ForwardOptions

    fused = _spy_fused_qkv(monkeypatch)

    cfg = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=160)
    draft = make_draft(tiny_params(cfg, seed=3, scale=0.1), DraftRecipe(group_size=32))
    toks, _ = random_prompts(np.random.default_rng(0), [72, 72], cfg.vocab_size)
    # steps from 40 to 72: the commits cross the flush at 64
    ref, kern = (_teacher_forced_logits(draft, cfg, toks, 40, 1, "draft", o)
                 for o in (ForwardOptions(backend="reference"), ForwardOptions(interpret=True)))
    assert rel_fro(kern, ref) < 1e-3
    assert (kern.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    assert fused and all(kw["q_layout"] == "rows" for kw in fused)  # the Triton attention's query rows


def test_the_projection_fuses_into_the_cache_write_only_where_the_kernel_takes_it():
    """`HierCache.fuses_projection`: the draft's one-token steps of up to MAX_M rows with a weight the
    INT4 kernel takes and a bias of x's dtype; never the target, a verify-shaped forward, more rows,
    an unsupported group size or a head whose half is no multiple of the column block."""
    from helpers import tiny_config
    from qspec_jax.hier_cache import DRAFT, TARGET, init_hier_cache

    cfg = tiny_config(head_dim=32)
    qw = quantize_rtn(jnp.ones((cfg.hidden_size, 8 * 32)), 32)
    odd = quantize_rtn(jnp.ones((96, 8 * 32)), 48)  # G = 48: not a kernel group size
    bf16 = jnp.bfloat16

    def fuses(batch=1, tokens=1, view=DRAFT, weight=qw, bias=None, head_dim=32):
        cache = init_hier_cache(tiny_config(head_dim=head_dim), batch, 128, group_size=32)
        return cache.fuses_projection(tokens, view, bf16, weight, bias)

    assert fuses() and fuses(batch=MAX_M) and fuses(bias=jnp.zeros((256,), bf16))
    assert not fuses(view=TARGET) and not fuses(tokens=4) and not fuses(batch=MAX_M + 1)
    assert not fuses(weight=odd) and not fuses(bias=jnp.zeros((256,), jnp.float32)) and not fuses(head_dim=24)


def test_target_verify_forward_through_interpreted_kernels_matches_reference():
    """The target's verify-shaped forwards (T = 3 new tokens, both planes) with the Pallas path in
    interpret mode (qkv_to_cache writing 3 buffer slots, the INT8 attention on its query rows, GQA 3)
    against the jnp reference path, teacher forced across a KV flush."""
    from helpers import random_prompts, tiny_config, tiny_params
    from qspec_jax.model import ForwardOptions

    cfg = tiny_config(hidden_size=192, num_heads=6, num_kv_heads=2, head_dim=64, intermediate_size=160)
    params = tiny_params(cfg, seed=5, scale=0.1)
    toks, _ = random_prompts(np.random.default_rng(1), [76, 76], cfg.vocab_size)
    ref, kern = (_teacher_forced_logits(params, cfg, toks, 52, 3, "target", o)
                 for o in (ForwardOptions(backend="reference"), ForwardOptions(interpret=True)))
    assert rel_fro(kern, ref) < 1e-4
    assert (kern.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("view,t", [("draft", 1), ("target", 4)])
def test_forward_through_the_interpreted_mosaic_attention_matches_reference(view, t, monkeypatch):
    """The decoder's Mosaic GPU path (`pallas_kernels.mgpu_attention`, interpreted): qkv_to_cache
    writing the Mosaic query tiles, the history and buffer programs, the merge, for the draft's
    one-token steps and the target's verify-shaped forwards (T = 4 x R = 4 = 16 query rows),
    against the jnp reference path, teacher forced across a KV flush (G = 128, head_dim 128, a bf16
    buffer)."""
    from helpers import random_prompts, tiny_config, tiny_params
    from qspec_jax.draft import DraftRecipe, make_draft
    from qspec_jax.model import ForwardOptions

    fused = _spy_fused_qkv(monkeypatch)
    cfg = tiny_config(hidden_size=256, num_heads=4, num_kv_heads=1, head_dim=128, intermediate_size=160,
                      num_layers=1)
    params = tiny_params(cfg, seed=7, scale=0.1)
    if view == "draft":
        params = make_draft(params, DraftRecipe(group_size=32))
    toks, _ = random_prompts(np.random.default_rng(2), [392, 392], cfg.vocab_size)
    mosaic = ForwardOptions(interpret=True, draft_history="mosaic", target_history="mosaic")
    kw = dict(group_size=128, capacity=512, dtype=jnp.bfloat16)
    # tokens 381 .. 391 (the verify: 376 .. 391): one quantized group, then two once the commits
    # cross 384 (the interpreter takes seconds per step, so few steps)
    start = 381 if t == 1 else 376
    ref, kern = (_teacher_forced_logits(params, cfg, toks, start, t, view, o, **kw)
                 for o in (ForwardOptions(backend="reference"), mosaic))
    assert rel_fro(kern, ref) < 2e-3  # f16 operands and p, against float32 reference sums
    assert (kern.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    # the draft's projection writes the Mosaic query tiles itself; the target's goes through qkv_to_cache
    assert {kw["q_layout"] for kw in fused} == ({"mosaic"} if view == "draft" else set())


def test_resolve_path_defaults_per_rows():
    assert resolve_path(1, "auto", None, None) == ("reduce", 16, 16)
    assert resolve_path(1, "auto", None, None, n=4096) == ("reduce", 8, 16)  # narrow N: more programs
    assert resolve_path(1, "auto", None, None, n=6144) == ("reduce", 16, 16)
    assert resolve_path(2, "auto", None, None, n=4096) == ("reduce", 16, 8)
    assert resolve_path(2, "auto", None, None) == ("reduce", 16, 8)
    assert resolve_path(3, "auto", None, None) == ("dot", 64, 1)
    assert resolve_path(4, "reduce", 32, None) == ("reduce", 32, 8)
    with pytest.raises(Int4ShapeError, match="path"):
        resolve_path(1, "simt", None, None)


def test_split_plan():
    assert split_plan(32, 896, 8) == (1, 32)  # 4096x14336 / block_n 16: enough programs already
    assert split_plan(112, 256, 8) == (2, 56)  # 14336x4096: ceil(264/256) = 2
    assert split_plan(32, 3, 8) == (4, 8)  # capped by n_groups // groups_per_step
    assert split_plan(10, 3, 2, 3) == (3, 4)  # 4 + 4 + 2 groups: a ragged last split
    assert split_plan(10, 3, 4, 2) == (2, 8)  # 8 + 2
    assert split_plan(3, 1, 8, 5) == (1, 3)  # 3 groups round up to one step: 1 split
    assert split_plan(5, 1, 1, 99) == (5, 1)  # at most one split per group


def test_quantized_weight_layout_round_trip():
    """pack_weight / unpack_codes / dequantize_weight round-trip; the K-major byte layout;
    the reference equals x @ dequantize_weight (ragged last group)."""
    rng = np.random.default_rng(3)
    k, n, g = 200, 24, 64
    ng = -(-k // g)
    codes = rng.integers(0, 16, size=(ng * g, n)).astype(np.uint8)
    codes[k:] = 0
    scale = rng.uniform(0.01, 0.1, size=(ng, n)).astype(np.float16)
    mn = rng.uniform(-1, 0, size=(ng, n)).astype(np.float16)
    qw = pack_weight(jnp.asarray(codes), scale, mn, k, g)
    assert qw.packed.shape == (n, ng, g // 2) and qw.packed.dtype == jnp.uint8
    assert qw.scale.shape == qw.minimum.shape == (n, ng) and qw.scale.dtype == jnp.float16
    assert qw.shape == (k, n) and qw.nbytes == n * ng * g // 2 + 4 * n * ng
    p = np.asarray(qw.packed)
    c3 = codes.reshape(ng, g, n)
    np.testing.assert_array_equal(p & 0xF, c3[:, : g // 2].transpose(2, 0, 1))  # byte j: row g*G + j
    np.testing.assert_array_equal(p >> 4, c3[:, g // 2:].transpose(2, 0, 1))  # high nibble: row g*G + G/2 + j
    np.testing.assert_array_equal(np.asarray(unpack_codes(qw)), codes)
    dense = (c3 * scale.astype(np.float32)[:, None] + mn.astype(np.float32)[:, None]).reshape(-1, n)[:k]
    np.testing.assert_array_equal(np.asarray(dequantize_weight(qw)), dense)
    np.testing.assert_array_equal(np.asarray(dequantize_weight(qw, out_major=True)), dense.T)
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    ref = highest(int4_matmul_reference, x, qw.packed, qw.scale, qw.minimum, group_size=g)
    assert rel_fro(ref, highest(jnp.dot, x, dequantize_weight(qw))) < 1e-6
    # RTN: within half a step of the weights; its codes re-pack to the same bytes
    w = rng.standard_normal((k, n)).astype(np.float32)
    qr = quantize_rtn(w, g)
    err = np.abs(np.asarray(dequantize_weight(qr)) - w)
    step = np.repeat(np.asarray(qr.scale, np.float32).T, g, axis=0)[:k]
    assert np.all(err <= 0.5 * step + 1e-2 * np.abs(w) + 1e-3)
    again = pack_weight(unpack_codes(qr), qr.scale.T, qr.minimum.T, k, g)
    np.testing.assert_array_equal(np.asarray(again.packed), np.asarray(qr.packed))


def test_int4_linear_dispatch():
    rng = np.random.default_rng(7)
    k, n, g = 200, 72, 64
    qw = quantize_rtn(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), g)
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
    ref = highest(int4_matmul_reference, x.reshape(6, k), qw.packed, qw.scale, qw.minimum, group_size=g)
    y = int4_linear(x, qw, backend="pallas", interpret=True)  # leading dims flattened (M = 6)
    assert y.shape == (2, 3, n)
    assert rel_fro(y.reshape(6, n), ref) < 2e-5
    y_auto = int4_linear(x, qw)  # CPU: auto -> reference
    assert rel_fro(y_auto.reshape(6, n), ref) < 2e-5
    # more than MAX_M rows: auto takes dequantize + XLA dot (prefill), which agrees closely
    for rows in (MAX_M + 1, 100):
        xb = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        refb = highest(int4_matmul_reference, xb, qw.packed, qw.scale, qw.minimum, group_size=g)
        assert pallas_unsupported_reason(rows, qw) is not None
        yb = highest(int4_linear, xb, qw, interpret=True)  # interpret: would pick pallas if it could
        assert rel_fro(yb, refb) < 2e-5


def test_int4_bad_inputs_raise_before_launch():
    rng = np.random.default_rng(8)
    qw = quantize_rtn(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32), 48)  # G=48 unsupported
    x = jnp.ones((1, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        int4_linear(x, qw, backend="pallas")
    assert int4_linear(x, qw, backend="auto").shape == (1, 40)  # falls back to the reference
    qw = quantize_rtn(jnp.asarray(rng.standard_normal((128, 40)), jnp.float32), 64)
    x = jnp.ones((1, 128), jnp.float32)
    call = lambda xx=x, p=qw.packed, s=qw.scale, mn=qw.minimum, **kw: int4_matmul(  # noqa: E731
        xx, p, s, mn, **{"group_size": 64, **kw})
    with pytest.raises(ValueError, match="features"):
        int4_linear(jnp.ones((1, 100)), qw)
    with pytest.raises(Int4ShapeError, match="M=9"):
        int4_linear(jnp.ones((9, 128), jnp.bfloat16), qw, backend="pallas")
    with pytest.raises(Int4ShapeError, match="M=9"):
        call(jnp.ones((9, 128)))
    with pytest.raises(Int4ShapeError, match="fma16 needs bfloat16 or float16"):
        call(fma16=True, interpret=True)  # x is float32 here
    with pytest.raises(Int4ShapeError, match="block_n .* got 96"):
        call(block_n=96)
    with pytest.raises(Int4ShapeError, match="block_n .* got 512"):
        call(block_n=512)
    with pytest.raises(Int4ShapeError, match="groups_per_step .* got 3"):
        call(groups_per_step=3)
    with pytest.raises(Int4ShapeError, match="tile"):
        call(block_n=256, groups_per_step=16)
    with pytest.raises(Int4ShapeError, match="split_k .* 0"):
        call(split_k=0)
    with pytest.raises(Int4ShapeError, match="num_warps .* 3"):
        call(num_warps=3)
    with pytest.raises(Int4ShapeError, match="K=200"):
        call(jnp.ones((1, 200)))
    with pytest.raises(Int4ShapeError, match="scale/minimum"):
        call(p=qw.packed[:-1])
    with pytest.raises(Int4ShapeError, match="scale/minimum"):
        call(mn=qw.minimum[:, :1])
    with pytest.raises(Int4ShapeError, match="packed .* got shape \\(40, 2, 16\\)"):
        call(p=qw.packed[:, :, :16])
    with pytest.raises(Int4ShapeError, match="K-major"):  # the old [n_groups*G/2, N] layout
        call(p=qw.packed.transpose(1, 2, 0).reshape(64, 40), s=qw.scale.T, mn=qw.minimum.T)
    with pytest.raises(Int4ShapeError, match="uint8"):
        call(p=qw.packed.astype(jnp.int8))
    with pytest.raises(Int4ShapeError, match="int32"):
        call(jnp.ones((1, 128), jnp.int32))
    assert "K-major" in pallas_unsupported_reason(1, qw.replace(packed=qw.packed.reshape(40, -1)))


# ---------------------------------------------------------------------------------------
# hierarchical attention
# ---------------------------------------------------------------------------------------

def make_cache(rng, b, kvh, d, g, sq, sb, dtype):
    k = jnp.asarray(rng.standard_normal((b, kvh, sq, d)) + 0.7 * rng.standard_normal((1, 1, 1, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kvh, sq, d)), jnp.float32)
    ku, kl, ks, km = kv_quant.quantize_keys(k, g)
    vu, vl, vs, vm = kv_quant.quantize_values(v, g)
    vu, vl = kv_quant.values_token_minor(vu, g), kv_quant.values_token_minor(vl, g)  # the cache's layout
    buf_k = jnp.asarray(rng.standard_normal((b, kvh, sb, d)), dtype)
    buf_v = jnp.asarray(rng.standard_normal((b, kvh, sb, d)), dtype)
    return ku, kl, ks, km, vu, vl, vs, vm, buf_k, buf_v


def rows_at(lengths, t, g):
    """Positions of T new tokens after `lengths` committed ones, and the buffer starts."""
    lengths = np.asarray(lengths)
    pos = lengths[:, None] + np.arange(t)[None, :]
    bst = g * np.maximum(lengths // g - 1, 0)
    return jnp.asarray(pos, jnp.int32), jnp.asarray(bst, jnp.int32)


# b, t, kvh, r, d, g, sq, sb, dtype, use_lower, kernel kwargs, list of committed lengths per row
# (sb = 2G + room; a length L puts the new tokens at L..L+T-1, buffer start G*max(L//G-1, 0))
ATTN_CASES = [
    pytest.param(3, 1, 2, 4, 128, 64, 512, 136, jnp.bfloat16, False, dict(block_k=64),
                 [[500, 3, 200], [64, 127, 511], [130, 0, 383]], id="draft-gqa4-d128-bf16"),
    pytest.param(2, 7, 1, 3, 64, 32, 256, 80, jnp.float32, True, dict(block_k=64),
                 [[249, 10], [63, 180], [31, 64]], id="verify-gqa3-d64-f32-blockk>G"),
    pytest.param(2, 7, 2, 8, 128, 32, 256, 72, jnp.bfloat16, True, dict(block_k=16, num_splits=3, prefetch=True),
                 [[249, 40], [96, 200]], id="verify-gqa8-d128-G32-bf16-prefetch"),
    pytest.param(2, 5, 2, 4, 128, 64, 512, 136, jnp.bfloat16, True, dict(block_k=64, unpack="asm"),
                 [[500, 3], [130, 383]], id="verify-gqa4-d128-bf16-asm-two-plane-dots"),
    pytest.param(2, 1, 2, 1, 64, 256, 1024, 520, jnp.float16, False, dict(unpack="cvt", block_kb=32),
                 [[1000, 511], [767, 0]], id="draft-gqa1-d64-G256-f16-cvt"),
    pytest.param(1, 3, 2, 2, 128, 32, 192, 70, jnp.float32, False, dict(block_k=32, prefetch=False,
                                                                         buffer_splits=2),
                 [[180], [66]], id="t3-gqa2-d128-G32-f32-nch2"),
    pytest.param(1, 4, 2, 4, 128, 128, 512, 264, jnp.bfloat16, True, dict(unpack="magic"),
                 [[500], [130]], id="verify-gqa4-d128-G128-bf16-magic-two-plane-dots"),
    pytest.param(1, 4, 1, 8, 128, 128, 512, 264, jnp.float16, True, dict(unpack="int8", num_splits=2),
                 [[500], [255], [130]], id="verify-gqa8-d128-G128-f16-int8-codes"),
]


@pytest.mark.parametrize("b,t,kvh,r,d,g,sq,sb,dtype,use_lower,kw,length_sets", ATTN_CASES)
def test_hier_attention_matches_reference(b, t, kvh, r, d, g, sq, sb, dtype, use_lower, kw, length_sets):
    rng = np.random.default_rng(b * 100 + t * 10 + r)
    cache = make_cache(rng, b, kvh, d, g, sq, sb, dtype)
    q = jnp.asarray(rng.standard_normal((b, t, kvh * r, d)), dtype)
    fn = jax.jit(lambda q_, pos, bst: hier_attention(q_, *cache, pos, bst, group_size=g, use_lower=use_lower,
                                                      interpret=True, **kw))
    cache32 = [a.astype(jnp.float32) if a.dtype == dtype else a for a in cache]
    for lengths in length_sets:
        pos, bst = rows_at(lengths, t, g)
        assert int(jnp.max(pos - bst[:, None])) < sb, "test bug: a query outside its buffer"
        y = fn(q, pos, bst)
        assert y.shape == q.shape and y.dtype == q.dtype
        ref = highest(hier_attention_reference, q.astype(jnp.float32), *cache32, pos, bst, group_size=g,
                      use_lower=use_lower)
        err = rel_fro(y, ref)
        assert err < TOL[jnp.dtype(dtype)], (lengths, err)


def test_hier_attention_full_buffer_and_empty_history():
    """Buffer full to its last slot; and every query before the first flush (Q = 0)."""
    rng = np.random.default_rng(5)
    b, t, kvh, r, d, g, sq, sb = 2, 2, 1, 4, 64, 32, 128, 66
    cache = make_cache(rng, b, kvh, d, g, sq, sb, jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, t, kvh * r, d)), jnp.float32)
    # row 0: buf_start 64, queries at 128, 129 -> slot 65 is the last one (full buffer);
    # row 1: queries at 10, 11 -> nothing quantized yet.
    pos = jnp.asarray([[128, 129], [10, 11]], jnp.int32)
    bst = jnp.asarray([64, 0], jnp.int32)
    for use_lower in (False, True):
        y = hier_attention(q, *cache, pos, bst, group_size=g, use_lower=use_lower, block_k=32, interpret=True)
        ref = highest(hier_attention_reference, q, *cache, pos, bst, group_size=g, use_lower=use_lower)
        assert rel_fro(y, ref) < 2e-5


@pytest.mark.parametrize("fixed_splits", [True, False])
def test_hier_attention_fixed_splits_make_a_query_independent_of_the_others(fixed_splits):
    """The exact mode's kernel property: a query's output is bitwise the same in a verify
    call (T = 8 rows: 6 tokens that cross a group boundary, 2 padding) and in a one-token
    call at its own committed length (other rows random, buffer shifted by a flush).
    With length-based splits (fixed_splits=False) it is not: the control case."""
    rng = np.random.default_rng(11)
    b, kvh, r, d, g, sq, sb, rows, t = 2, 2, 4, 64, 32, 256, 72, 8, 6
    hk, hv = (jnp.asarray(rng.standard_normal((b, kvh, sq, d)), jnp.float32) for _ in range(2))
    planes = kv_quant.quantize_keys(hk, g), kv_quant.quantize_values(hv, g)
    (ku, kl, ks, km), (vu, vl, vs, vm) = planes
    vu, vl = kv_quant.values_token_minor(vu, g), kv_quant.values_token_minor(vl, g)

    def call(q, lengths, pos):  # buffer slot i holds position buf_start + i, as in the cache
        bst = g * np.maximum(lengths // g - 1, 0)
        idx = jnp.clip(jnp.asarray(bst)[:, None] + jnp.arange(sb), 0, sq - 1)
        bk, bv = (jax.vmap(lambda h, i: h[:, i])(h, idx) for h in (hk, hv))
        return fn(q, bk, bv, jnp.asarray(pos, jnp.int32), jnp.asarray(bst, jnp.int32))

    fn = jax.jit(lambda q, bk, bv, pos, bst: hier_attention(
        q, ku, kl, ks, km, vu, vl, vs, vm, bk, bv, pos, bst, group_size=g, use_lower=True, block_k=32,
        num_splits=3, fixed_splits=fixed_splits, interpret=True))
    lengths = np.asarray([94, 60])  # 94..99 crosses 96: the quantized prefix and buffer start move
    q = jnp.asarray(rng.standard_normal((b, rows, kvh * r, d)), jnp.float32)
    verify = call(q, lengths, lengths[:, None] + np.minimum(np.arange(rows), t - 1))
    diffs = []
    for j in range(t):
        qj = jnp.asarray(rng.standard_normal(q.shape), jnp.float32).at[:, 0].set(q[:, j])
        step = call(qj, lengths + j, np.repeat((lengths + j)[:, None], rows, axis=1))
        diffs.append(float(jnp.max(jnp.abs(step[:, 0] - verify[:, j]))))
    if fixed_splits:
        assert diffs == [0.0] * t
    else:
        assert max(diffs) > 0


def test_hier_attention_auto_dispatch_and_bad_inputs():
    rng = np.random.default_rng(6)
    b, t, kvh, r, d, g, sq, sb = 1, 1, 2, 2, 64, 32, 128, 70
    cache = make_cache(rng, b, kvh, d, g, sq, sb, jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, t, kvh * r, d)), jnp.float32)
    pos, bst = rows_at([100], t, g)
    ref = hier_attention_reference(q, *cache, pos, bst, group_size=g, use_lower=False)
    y = hier_attention_auto(q, *cache, pos, bst, group_size=g, use_lower=False)  # CPU -> reference
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=0)
    call = lambda qq=q, cc=cache, **kw: hier_attention(qq, *cc, pos, bst, **{  # noqa: E731
        "group_size": g, "use_lower": False, "interpret": True, **kw})
    with pytest.raises(HierAttentionShapeError, match="group_size"):
        call(group_size=48)
    with pytest.raises(HierAttentionShapeError, match="block_k"):
        call(block_k=48)
    with pytest.raises(HierAttentionShapeError, match="GQA"):
        call(qq=jnp.ones((b, t, kvh * 9, d)))
    with pytest.raises(HierAttentionShapeError, match="head_dim"):
        bad = make_cache(rng, b, kvh, 32, g, sq, sb, jnp.float32)
        call(qq=jnp.ones((b, t, kvh * r, 32)), cc=bad)
    with pytest.raises(HierAttentionShapeError, match="T="):
        call(qq=jnp.ones((b, 17, kvh * r, d)))
    with pytest.raises(HierAttentionShapeError, match="positions"):
        hier_attention(jnp.ones((b, 2, kvh * r, d)), *cache, pos, bst, group_size=g, use_lower=False)
    with pytest.raises(HierAttentionShapeError, match="use_lower"):
        hier_attention(q, cache[0], None, *cache[2:5], None, *cache[6:], pos, bst, group_size=g, use_lower=True)
    with pytest.raises(HierAttentionShapeError, match="use_lower=True"):  # the INT8 codes need both planes
        hier_attention(q, *cache, pos, bst, group_size=g, use_lower=False, unpack="int8", interpret=True)
    with pytest.raises(ValueError, match="backend"):
        hier_attention_auto(q, *cache, pos, bst, group_size=g, use_lower=False, backend="cuda")
    # "pallas" refuses what it cannot take before launch; "auto" falls back to the reference
    with pytest.raises(HierAttentionShapeError):
        hier_attention_auto(q, *cache, pos, bst, group_size=g, use_lower=False, backend="pallas", block_k=48)
    # prepared query rows (qkv_to_cache's output; identity rope here) give the same output as q
    from pallas_kernels.qkv_to_cache import qkv_to_cache_reference

    kv = jnp.zeros((b, t, 2 * kvh * d), q.dtype)
    ones, zeros = jnp.ones((b, t, d)), jnp.zeros((b, t, d))
    q_rows = qkv_to_cache_reference(jnp.concatenate([q.reshape(b, t, -1), kv], -1), ones, zeros, cache[8],
                                    cache[9], bst, num_heads=kvh * r, num_kv_heads=kvh)[0]
    np.testing.assert_array_equal(np.asarray(call(qq=jnp.zeros_like(q), q_rows=q_rows)), np.asarray(call()))
    with pytest.raises(HierAttentionShapeError, match="q_rows"):
        call(q_rows=q_rows[:, :, :8])
    with pytest.raises(HierAttentionShapeError, match="q_rows"):  # the reference would ignore them
        hier_attention_auto(q, *cache, pos, bst, group_size=g, use_lower=False, backend="reference", q_rows=q_rows)


# ---------------------------------------------------------------------------------------
# the profiling helper that reads Nsight Compute's SASS page (scripts/sass_summary.py)
# ---------------------------------------------------------------------------------------

def _script(name: str, monkeypatch=None):
    """scripts/<name>.py loaded as a module (with monkeypatch: scripts/ on sys.path for its own
    imports, e.g. bench_decode's of bench_kernels)."""
    import importlib.util
    if monkeypatch is not None:
        monkeypatch.syspath_prepend("scripts")
    spec = importlib.util.spec_from_file_location(name, f"scripts/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sass_summary_reads_ncu_source_csv(tmp_path, capsys):
    mod = _script("sass_summary")
    hdr = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
           '"stall_long_sb","stall_wait","stall_long_sb (Not Issued)"')
    rows = [("0x0", "LDC R1, c[0x0][0x0]", 1, 4, 0, 1, 0)]
    rows += [(f"0x{16 * k:x}", src, s, 800, s if "LDG" in src else 0, 0 if "LDG" in src else s, 0)
             for k, (src, s) in enumerate([("LDG.E.U16 R2, desc[UR4][R4.64]", 30), ("@!P0 FMUL R3, R2, R2", 50),
                                           ("HMMA.16816.F32.BF16 R8, R4, R6, R8", 5), ("FMUL R3, R3, R3", 15)], 1)]
    lines = ['"Kernel Name","hier_attention",', hdr] + [",".join(f'"{v}"' for v in r) for r in rows]
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(lines) + "\n")
    assert mod.main.__module__ == "sass_summary"
    [(name, ins)] = mod.kernels(str(path))
    assert name == "hier_attention" and len(ins) == 5
    mod.summarize(name, ins)
    out = capsys.readouterr().out
    assert "hottest loop body: 4 instructions executed 800 times" in out
    assert "wait 70%" in out and "long_sb 30%" in out  # samples by reason, Not-Issued columns left out
    fmul = [line for line in out.splitlines() if line.startswith("FMUL")][0].split()
    assert fmul[1:] == ["49.9", "64.4", "2"]  # 1600 of 3204 executed, 65 of 101 samples; @!P0 FMUL is an FMUL


def test_hier_attention_merge_kernel_matches_xla_merge(t=5, r=3):
    """The Pallas merge of the splits (`merge_partials`: pow2-padded splits, padded heads for
    R = 3; every other attention test runs it with R a power of 2) against XLA's max-then-sums merge, on the same partials (3 splits + 2 buffer ones)."""
    rng = np.random.default_rng(40 + r)
    b, kvh, d, g, sq, sb = 2, 2, 64, 32, 256, 72
    cache = make_cache(rng, b, kvh, d, g, sq, sb, jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, t, kvh * r, d)), jnp.float32)
    pos, bst = rows_at([200, 61], t, g)
    outs = [hier_attention(q, *cache, pos, bst, group_size=g, use_lower=True, block_k=32, num_splits=3,
                           buffer_splits=2, merge=mg, interpret=True) for mg in ("pallas", "xla")]
    assert outs[0].shape == outs[1].shape == q.shape
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=2e-6, atol=2e-6)
    with pytest.raises(HierAttentionShapeError, match="merge"):
        hier_attention(q, *cache, pos, bst, group_size=g, use_lower=True, merge="cuda", interpret=True)


# ---------------------------------------------------------------------------------------
# q / k / v into the cache (rope, buffer writes, query rows)
# ---------------------------------------------------------------------------------------

# b, t, heads, kv heads, head dim, buffer slots, dtype
QKV_CASES = [
    pytest.param(1, 1, 32, 8, 128, 264, jnp.bfloat16, id="llama8b-draft-step"),
    pytest.param(3, 5, 6, 2, 64, 50, jnp.float32, id="gqa3-t5-f32"),
    pytest.param(2, 4, 4, 4, 64, 20, jnp.float16, id="gqa1-t4-f16"),
    pytest.param(2, 3, 16, 2, 128, 40, jnp.bfloat16, id="gqa8-t3"),
]


@pytest.mark.parametrize("b,t,h,kvh,d,sb,dtype", QKV_CASES)
def test_qkv_to_cache_matches_reference(b, t, h, kvh, d, sb, dtype):
    from pallas_kernels.qkv_to_cache import qkv_to_cache, qkv_to_cache_reference

    rng = np.random.default_rng(b * 100 + t * 10 + h)
    qkv = jnp.asarray(rng.standard_normal((b, t, (h + 2 * kvh) * d)), dtype)
    ang = rng.uniform(0, 6.3, (b, t, d // 2))
    cos = jnp.asarray(np.cos(np.concatenate([ang, ang], -1)), jnp.float32)
    sin = jnp.asarray(np.sin(np.concatenate([ang, ang], -1)), jnp.float32)
    buf_k, buf_v = (jnp.asarray(rng.standard_normal((b, kvh, sb, d)), dtype) for _ in range(2))
    slot = jnp.asarray(rng.integers(0, sb - t + 1, size=b), jnp.int32)
    kw = dict(num_heads=h, num_kv_heads=kvh)
    ref = qkv_to_cache_reference(qkv, cos, sin, buf_k, buf_v, slot, **kw)
    out = jax.jit(lambda *a: qkv_to_cache(*a, **kw, interpret=True))(qkv, cos, sin, buf_k, buf_v, slot)
    # one rounding of the projections' dtype: XLA on CPU may contract the rope's float32 fma differently
    tol = float(jnp.finfo(dtype).eps)
    for name, a, c in zip(("q_rows", "buf_k", "buf_v"), ref, out):
        assert a.shape == c.shape and a.dtype == c.dtype, name
        np.testing.assert_allclose(np.asarray(c, np.float32), np.asarray(a, np.float32), rtol=tol, atol=1e-6,
                                   err_msg=name)
    # the rows past T * R are zeros; the buffers change at the T written slots only
    assert not np.any(np.asarray(out[0])[:, :, t * (h // kvh):])
    changed = np.any(np.asarray(out[2] != buf_v), axis=(1, 3))  # [B, Sb]
    want = np.zeros_like(changed)
    for i, s in enumerate(np.asarray(slot)):
        want[i, s:s + t] = True
    np.testing.assert_array_equal(changed, want)


def test_qkv_to_cache_bad_inputs_raise():
    from pallas_kernels.qkv_to_cache import QkvToCacheError, qkv_to_cache

    qkv = jnp.ones((1, 1, 12 * 64))
    cs = jnp.ones((1, 1, 64))
    buf = jnp.zeros((1, 2, 8, 64))
    slot = jnp.zeros((1,), jnp.int32)
    with pytest.raises(QkvToCacheError, match="columns"):
        qkv_to_cache(qkv, cs, cs, buf, buf, slot, num_heads=9, num_kv_heads=2, interpret=True)
    with pytest.raises(QkvToCacheError, match="buffers"):
        qkv_to_cache(qkv, cs, cs, buf[:, :1], buf[:, :1], slot, num_heads=8, num_kv_heads=2, interpret=True)
    with pytest.raises(QkvToCacheError, match="slot"):
        qkv_to_cache(qkv, cs, cs, buf, buf, slot[:0], num_heads=8, num_kv_heads=2, interpret=True)



def test_per_step_time_leaves_out_the_per_call_cost(monkeypatch):
    """bench_decode's --steps-long: the slope between two loop lengths is the step's time whatever a
    call costs besides; without it, per call / steps (which carries that cost)."""
    mod = _script("bench_decode", monkeypatch)
    calls = []

    def run(k):  # a call of k steps: 5 units of dispatch + 2 per step; the first call (warm-up) slower
        calls.append(k)
        return 5.0 + 2.0 * k + (100.0 if len(calls) == 1 else 0.0)
    step, per_call = mod.per_step(run, 4, 12, repeats=3)
    assert step == 2.0 and per_call == (5.0 + 8.0) / 4
    assert calls == [4] * 4 + [12] * 4
    assert mod.per_step(lambda k: 5.0 + 2.0 * k, 4, 0, repeats=1) == ((5.0 + 8.0) / 4, None)


def test_kernel_gaps_sums_the_idle_time_between_a_streams_kernels(monkeypatch):
    """bench_decode's profile helper: the idle time before each kernel on its own stream, summed by
    the (previous, next) pair; overlapping kernels count as no gap."""
    mod = _script("bench_decode", monkeypatch)
    events = [("qkv", 10, 0, "s1"), ("attn", 5, 12, "s1"), ("qkv", 10, 20, "s1"), ("attn", 5, 31, "s1"),
              ("copy", 3, 0, "s2"), ("copy", 3, 2, "s2")]
    total, rows = mod.kernel_gaps(events)
    assert total == 6.0
    assert rows[0] == (3.0, 2, "qkv -> attn") and (3.0, 1, "attn -> qkv") in rows and (0.0, 1, "copy -> copy") in rows


def test_report_speedup_projects_from_the_measured_times(tmp_path, monkeypatch, capsys):
    """report_speedup's projection: Omega(a, gamma) * t_AR / (gamma * t_draft + t_verify), the best
    gamma, and the same with bench_decode's measured round; the ideal from the byte model."""
    import json
    mod = _script("report_speedup")
    cfg = {"vocab_size": 1000, "hidden_size": 64}
    row = {"context": 32768, "ar_ms": 8.0, "draft_ms": 2.5, "verify_ms": 6.5, "round_ms": 15.0, "flush_ms": 0.9,
           "verify_ms_by_gamma": {"2": 6.4, "3": 6.5}}
    dec = {"card": "test card", "date": "2026-11-27", "config": cfg, "weight_bytes": 16e9 + 1000 * 64 * 2,
           "rows": [row], "command": "bench_decode.py --gamma 3"}  # (no "gamma" key: read from the command)
    path = tmp_path / "decode.json"
    path.write_text(json.dumps(dec))
    monkeypatch.setattr("sys.argv", ["report_speedup.py", "--decode", str(path)])
    mod.main()
    out = capsys.readouterr().out
    om3 = (1 - 0.9 ** 4) / 0.1
    s2, s3 = (1 - 0.9 ** 3) / 0.1 * 8.0 / (2 * 2.5 + 6.4), om3 * 8.0 / (3 * 2.5 + 6.5)
    assert s3 > s2  # so gamma 3 is the best
    cd, cv, _ = mod.byte_costs(32768, 16e9)
    ideal3 = om3 / (3 * cd + cv)
    best = [ln for ln in out.splitlines() if ln.startswith("| 32K | 3 |") and "of ideal) |" in ln]
    assert len(best) == 1, out
    cells = [c.strip() for c in best[0].split("|")[1:-1]]
    assert cells[2] == f"{s3:.2f}x" and cells[3] == f"{ideal3:.2f}x" and cells[4] == f"{100 * s3 / ideal3:.0f}%"
    by_round = om3 * 8.0 / 15.0
    assert cells[6] == f"{by_round:.2f}x ({100 * by_round / ideal3:.0f}%)"
    assert f"{s2:.2f}x" in out
    flush_per_round = 0.9 * om3 / 128  # one flush per G = 128 tokens, om3 tokens per round
    assert f"| 32K | 0.900 ms | {flush_per_round * 1e3:.1f} us | {100 * flush_per_round / (3 * 2.5 + 6.5):.2f}% |" in out
