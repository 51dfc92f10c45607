"""A layer's new q / k / v into what the hierarchical attention reads, in one kernel.

Per program (row b, KV head h, new token t): the rotary embedding of the head's keys and of its R
query heads, the keys and values written into the full-precision buffer at their slots (in place:
the buffers are aliased to the outputs), and the queries scaled by sm_scale * log2(e) and laid
out as the attention kernel's query rows [B, KVH, rows, D] (row t * R + r; rows past T * R zero).

XLA made three kernels of this per layer in a decode step (the queries' rope + padding, and one
dynamic-update-slice per buffer: 1.4 + 1.3 + 1.3 us of a draft step at 32K on the H100,
docs/benchmarks.md session 8); this one takes 1.5 us (session 10). The arithmetic is the XLA
path's: rope in float32 on the rounded projections (`qspec_jax.rope.apply_rope`: x * cos +
rotate_half(x) * sin), rounded to the projections' dtype before the buffers and before the query
scale. Whether a multiply and the add become one fma differs between XLA and Triton, so a value
can differ by a rounding of that dtype (H100: queries within 4e-3 relative in bf16, keys and
values bitwise equal). Every program that decodes with the Pallas path uses this kernel, so the
lossless exact mode still compares like with like (4/4 rows at gamma 1 / 4 / 7).

The draft's one-token steps do this work in their q | k | v GEMV's epilogue instead
(`int4_matmul.int4_qkv_to_cache`, the same arithmetic); this kernel serves the target's passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qspec_jax.kv_cache import write_rows
from qspec_jax.rope import apply_rope

try:  # Pallas-Triton: only needed on GPU (interpret mode runs anywhere)
    from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover
    plgpu = None

LOG2E = 1.4426950408889634


class QkvToCacheError(ValueError):
    """Inputs the kernel does not take (raised before launch)."""


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def query_rows_count(t: int, r: int) -> int:
    """Rows of the attention kernel's query tile: T * R padded to a power of 2, at least 16."""
    return max(16, _next_pow2(t * r))


def query_rows(q, num_kv_heads: int, sm_scale: float):
    """q [B, T, H, D] -> the attention kernel's query rows f32 [B, KVH, rows, D]: row t * R + r is
    query head kvh * R + r of token t, scaled by sm_scale * log2(e); rows past T * R are zero."""
    b, t, h, d = q.shape
    r = h // num_kv_heads
    qf = (q.astype(jnp.float32) * (sm_scale * LOG2E)).reshape(b, t, num_kv_heads, r, d).transpose(0, 2, 1, 3, 4)
    pad = query_rows_count(t, r) - t * r
    return jnp.pad(qf.reshape(b, num_kv_heads, t * r, d), ((0, 0), (0, 0), (0, pad), (0, 0)))


def rope_halves(x1, x2, c1, c2, s1, s2, dtype):
    """apply_rope on a head's two channel halves in float32, rounded to dtype (the kernels' form:
    x * cos + rotate_half(x) * sin)."""
    return (x1 * c1 + (-x2) * s1).astype(dtype), (x2 * c2 + x1 * s2).astype(dtype)


def query_layout(n: int, b: int, t: int, h: int, kvh: int, buf_k, buf_v, q_layout: str, sm_scale):
    """The checks and the query output shared by `qkv_to_cache` and the draft's fused projection
    (`int4_matmul.int4_qkv_to_cache`): n = (H + 2 KVH) * D projection columns, buffers [B, KVH, Sb,
    D], T new tokens per row. -> (D, R, query rows, mosaic?, the query output's type, the query
    scale sm_scale * log2(e)); QkvToCacheError for anything else."""
    err = QkvToCacheError
    if kvh < 1 or h % kvh or n % (h + 2 * kvh):
        raise err(f"{n} columns are not (H + 2 KVH) * D for H={h}, KVH={kvh}")
    d = n // (h + 2 * kvh)
    if buf_k.shape != buf_v.shape or buf_k.shape[:2] != (b, kvh) or buf_k.shape[3] != d:
        raise err(f"buffers must be [B, KVH, Sb, D] = [{b}, {kvh}, Sb, {d}], got {buf_k.shape}, {buf_v.shape}")
    r = h // kvh
    rows = query_rows_count(t, r)
    if q_layout not in ("rows", "mosaic") or (q_layout == "mosaic" and rows > 32):
        raise err(f"q_layout must be 'rows' or 'mosaic' (T * R <= 32), got {q_layout!r} with T * R = {t * r}")
    mosaic = q_layout == "mosaic"
    q_type = (jax.ShapeDtypeStruct((b, kvh, 2, rows, d // 2), jnp.float16) if mosaic
              else jax.ShapeDtypeStruct((b, kvh, rows, d), jnp.float32))
    return d, r, rows, mosaic, q_type, (d ** -0.5 if sm_scale is None else sm_scale) * LOG2E


def qkv_to_cache_reference(qkv, cos, sin, buf_k, buf_v, slot, *, num_heads: int, num_kv_heads: int,
                           sm_scale: float | None = None, q_layout: str = "rows"):
    """qkv [B, T, (H + 2 KVH) * D] (q | k | v columns), cos / sin f32 [B, T, D], buffers
    [B, KVH, Sb, D], slot int32 [B] (buffer slot of each row's first new token).
    Returns (q_rows f32 [B, KVH, rows, D], buf_k, buf_v); q_layout "mosaic": the queries as the
    Mosaic attention's f16 [B, KVH, 2, rows, D/2] (`mgpu_attention.mosaic_query_rows`)."""
    b, t, n = qkv.shape
    h, kvh = num_heads, num_kv_heads
    d = n // (h + 2 * kvh)
    x = qkv.reshape(b, t, h + 2 * kvh, d)
    q, k = apply_rope(x[:, :, :h], cos, sin), apply_rope(x[:, :, h:h + kvh], cos, sin)
    v = x[:, :, h + kvh:]
    q_rows = query_rows(q, kvh, d ** -0.5 if sm_scale is None else sm_scale)
    if q_layout == "mosaic":
        from pallas_kernels.mgpu_attention import mosaic_query_rows
        q_rows = mosaic_query_rows(q_rows)
    return q_rows, write_rows(buf_k, k.transpose(0, 2, 1, 3), slot), write_rows(buf_v, v.transpose(0, 2, 1, 3), slot)


def _kernel(qkv_ref, cos_ref, sin_ref, slot_ref, _bk_in, _bv_in, q_ref, bk_ref, bv_ref, *, t, h, kvh, r, r_pad,
            half, rows, sb, scale, dtype, mosaic):
    """Program (row b, KV head, token t). Every load is issued before the first store: the
    compiler cannot move a load above a store it may alias, and one token per program keeps
    the latency at one round trip whatever T is (T = 4 in one program: 5.3 us, H100)."""
    f32 = jnp.float32
    bi, hk, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot = slot_ref[bi]
    qmask = jnp.arange(r_pad, dtype=jnp.int32) < r
    sides = (pl.ds(0, half), pl.ds(half, half))
    c1, c2 = (cos_ref[bi, ti, c] for c in sides)
    s1, s2 = (sin_ref[bi, ti, c] for c in sides)
    kx = [qkv_ref[bi, ti, h + hk, c].astype(f32) for c in sides]
    vx = [qkv_ref[bi, ti, h + kvh + hk, c] for c in sides]
    qx = [plgpu.load(qkv_ref.at[bi, ti, pl.ds(hk * r, r_pad), c], mask=qmask[:, None], other=0).astype(f32)
          for c in sides]

    def rope(x1, x2):  # apply_rope's float32 products and add, rounded to the projections' dtype
        return rope_halves(x1, x2, c1, c2, s1, s2, dtype)

    ok = jnp.full((half,), slot + ti < sb)
    for ref, vals in ((bk_ref, rope(*kx)), (bv_ref, vx)):
        for val, c in zip(vals, sides):
            plgpu.store(ref.at[bi, hk, slot + ti, c], val.astype(ref.dtype), mask=ok)
    # mosaic: q_ref [B, KVH, 2, rows, D/2] f16, one channel half per index of axis 2 (a traced
    # index: a Python int there fails the interpreter's store)
    if mosaic:
        qdst = lambda i, rr: q_ref.at[bi, hk, jnp.int32(i), rr, pl.ds(0, half)]  # noqa: E731
    else:
        qdst = lambda i, rr: q_ref.at[bi, hk, rr, sides[i]]  # noqa: E731
    for i, val in enumerate(rope(*qx)):
        plgpu.store(qdst(i, pl.ds(ti * r, r_pad)), (val.astype(f32) * scale).astype(q_ref.dtype), mask=qmask[:, None])
    # the padded query rows (token 0's program): zeros (the attention computes them and masks their outputs)
    pad = (jnp.arange(rows, dtype=jnp.int32) >= t * r) & (ti == 0)
    for i in range(2):
        plgpu.store(qdst(i, pl.ds(0, rows)), jnp.zeros((rows, half), q_ref.dtype), mask=pad[:, None])


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "sm_scale", "num_warps", "q_layout",
                                             "interpret"))
def qkv_to_cache(qkv, cos, sin, buf_k, buf_v, slot, *, num_heads: int, num_kv_heads: int,
                 sm_scale: float | None = None, num_warps: int = 2, q_layout: str = "rows", interpret: bool = False):
    """Pallas version of `qkv_to_cache_reference` (same contract; the same numbers up to the fma
    contraction of the float32 rope). Inside a jitted decode loop whose buffers are carried, the
    buffer updates are in place (input_output_aliases; the draft step's profile shows no copies).
    q_layout "mosaic" writes the queries as the Mosaic attention takes them (T * R <= 32),
    which saves a transpose kernel per layer."""
    err = QkvToCacheError
    if qkv.ndim != 3 or cos.shape != sin.shape or cos.ndim != 3 or cos.shape[:2] != qkv.shape[:2]:
        raise err(f"qkv must be [B, T, N] and cos / sin [B, T, D]: {qkv.shape}, {cos.shape}, {sin.shape}")
    b, t, n = qkv.shape
    h, kvh = num_heads, num_kv_heads
    d, r, rows, mosaic, q_type, scale = query_layout(n, b, t, h, kvh, buf_k, buf_v, q_layout, sm_scale)
    if d % 2 or d & (d - 1) or cos.shape[2] != d:
        raise err(f"head_dim {d} must be a power of 2 matching cos / sin ({cos.shape[2]})")
    if slot.shape != (b,):
        raise err(f"slot must be [B] = ({b},), got {slot.shape}")
    kernel = functools.partial(_kernel, t=t, h=h, kvh=kvh, r=r, r_pad=_next_pow2(r), half=d // 2, rows=rows,
                               sb=buf_k.shape[2], scale=scale, dtype=qkv.dtype, mosaic=mosaic)
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        kernel,
        grid=(b, kvh, t),
        out_shape=[q_type, jax.ShapeDtypeStruct(buf_k.shape, buf_k.dtype),
                   jax.ShapeDtypeStruct(buf_v.shape, buf_v.dtype)],
        input_output_aliases={4: 1, 5: 2},
        compiler_params=params,
        interpret=interpret,
        name="qkv_to_cache",
    )(qkv.reshape(b, t, h + 2 * kvh, d), cos.astype(jnp.float32), sin.astype(jnp.float32),
      slot.astype(jnp.int32), buf_k, buf_v)
