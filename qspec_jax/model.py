"""A pure-functional Llama-family transformer (Llama 2/3/3.1/3.2, Qwen2 q/k/v bias).

Parameters are a `Params` pytree; caches are pytrees passed in and returned. Layers are
unrolled (a tuple of per-layer params, not a scanned stack): on the H100 a scanned stack
with a stacked cache moved ~3x the bytes (see docs/design.md).

Data path: tokens -> embed -> [rms_norm -> fused qkv -> rope -> cache.attend -> o -> +
rms_norm -> swiglu mlp -> +] x L -> final rms_norm -> hidden (a draft's INT4 GEMVs on the
Pallas path take the norms, silu * up and the residual adds into the kernel: `norm_linear`,
`linear_residual`). `lm_logits` turns hidden
states into logits, so callers pick the positions they need (prefill of 128K tokens
computes logits for one position per row, not 128K).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int4_matmul import int4_matmul_reference
from qspec_jax.config import LlamaConfig
from qspec_jax.quant_weights import QuantizedWeight
from qspec_jax.rope import apply_rope, rope_tables

Array = jax.Array
Weight = Any  # jax.Array [in, out] or QuantizedWeight


@flax.struct.dataclass
class LayerParams:
    """One decoder layer's weights (a pytree). Linear weights are [in, out] arrays in the
    model dtype, or `QuantizedWeight` (INT4) in a draft.

    q/k/v and gate/up are stored fused (columns q | k | v and gate | up): one GEMV per
    group instead of three / two. At batch 1 that matters: on an H200 the 8B-shape AR step
    at 32K went from 7.99 to 6.15 ms (XLA's small k/v GEMVs and the separate gate/up ran
    far from bandwidth; docs/benchmarks.md). Checkpoints keep the separate names
    (`expected_shapes`); `params_from_flat` fuses, `params_to_flat` splits."""

    attn_norm: Array  # [hidden]
    wqkv: Weight  # [hidden, (heads + 2*kv_heads)*head_dim]
    wo: Weight  # [heads*head_dim, hidden]
    mlp_norm: Array  # [hidden]
    w_gate_up: Weight  # [hidden, 2*intermediate]
    w_down: Weight  # [intermediate, hidden]
    bqkv: Array | None = None  # Qwen2 q/k/v biases, fused like wqkv: [(heads + 2*kv_heads)*head_dim]


@flax.struct.dataclass
class Params:
    """All model weights (a pytree, jit argument): embed [vocab, hidden], `layers` (a tuple of
    `LayerParams`, unrolled in `forward`), final_norm [hidden], lm_head [hidden, vocab] or None
    when tied to the embedding. A draft (`make_draft`) has the same structure with INT4 leaves."""

    embed: Array  # [vocab, hidden]
    layers: tuple[LayerParams, ...]
    final_norm: Array  # [hidden]
    lm_head: Weight | None = None  # [hidden, vocab]; None when tied to embed


# LayerParams fields stored under their own checkpoint (flat) name, and the fused fields
# with the checkpoint names they concatenate (columns in this order).
UNFUSED = ("attn_norm", "wo", "mlp_norm", "w_down")
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up"), "bqkv": ("bq", "bk", "bv")}


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static choices of implementation (never change the function computed).

    backend: "reference" (jnp, any device), "pallas" (GPU kernels) or "auto".
    exact_rows: compute token-wise contractions one token at a time, so that a pass over
      T tokens gives bitwise the numbers of T one-token passes (CPU float32 lossless tests).
    fixed_rows: 0 (off) or R: every incremental (non-prefill) forward and `lm_logits` over
      [B, T, hidden] runs on exactly R token rows per sequence (the T real ones first, then
      padding), and the Pallas attention splits its work by token position instead of by
      the rows' lengths. A token's numbers then do not depend on how many tokens share its
      forward, because every kernel sees one shape (on the GPU, XLA's dots and our kernels
      are row-invariant at a fixed shape; measured on the H100): greedy speculative
      decoding with gamma + 1 <= R reproduces autoregressive decoding run with the same R
      bit for bit. Costs R-row matmuls (free at batch 1, memory bound) and R-query
      attention in the one-token steps of the target; the draft never pads.
    prefill_block: query/key block of the exact prefill attention.
    interpret: run the Pallas kernels in interpret mode (implies the Pallas path on any
      device: CPU tests of what the GPU runs).
    draft_history: which kernel reads the quantized history and the buffer in the draft's
      one-token steps on the Pallas path: "triton" (`hier_attention`'s own programs), "mosaic"
      (`pallas_kernels.mgpu_attention`: sm_90 GPUs, head_dim = group size = 128, a bf16 / f16
      buffer of a multiple of 8 slots) or "auto" (mosaic where it applies and not interpreted,
      else triton). H100, session 11: draft step 3.04 -> 3.00 ms at 32K, 4.80 -> 4.59 ms at 128K.
    target_history: the same choice for the target's decode steps and verify passes (both
      planes, T * R <= 32 query rows per KV head, not the exact mode's position-fixed splits);
      "auto" is "mosaic" for the target's steps and verify passes (up to 32 query rows per KV
      head, T * R) outside the exact mode where it applies, else "triton" (H100, session 15: the
      verify pass ~1% shorter at gamma 2-3, 6-11% at gamma 4; and with the steps and the verify
      in one kernel, greedy speculation parts from greedy decoding later at near-ties).
    l2_prefetch: bytes of the INT4 weights read after the attention (the o-projection, then a
      prefix of gate | up) that the Mosaic attention prefetches into the L2 cache at the end of
      its programs (0: none).
    fused_projection: the draft's one-token steps compute their q / k / v projection and
      qkv_to_cache's rope, buffer writes and query rows in one kernel
      (`int4_matmul.int4_qkv_to_cache`); False keeps the two kernels (for A/B runs).
    """

    backend: str = "auto"
    exact_rows: bool = False
    fixed_rows: int = 0
    prefill_block: int = 1024
    interpret: bool = False
    draft_history: str = "auto"
    target_history: str = "auto"
    l2_prefetch: int = 24 << 20
    fused_projection: bool = True

    def __post_init__(self):
        if not isinstance(self.fixed_rows, int) or self.fixed_rows < 0:
            raise ValueError(f"fixed_rows must be an int >= 0 (0 = off), got {self.fixed_rows!r}")
        if not isinstance(self.l2_prefetch, int) or self.l2_prefetch < 0:
            raise ValueError(f"l2_prefetch must be a byte count >= 0, got {self.l2_prefetch!r}")
        for name in ("draft_history", "target_history"):
            if getattr(self, name) not in ("auto", "triton", "mosaic"):
                raise ValueError(f"{name} must be 'auto', 'triton' or 'mosaic', got {getattr(self, name)!r}")

    def for_draft(self) -> "ForwardOptions":
        """The draft's options: never padded (only the target's numbers must be invariant)."""
        return dataclasses.replace(self, fixed_rows=0) if self.fixed_rows else self

    def use_pallas(self) -> bool:
        if self.interpret:
            return True
        if self.backend == "auto":
            return jax.default_backend() == "gpu"
        if self.backend not in ("pallas", "reference"):
            raise ValueError(f"backend must be 'auto', 'pallas' or 'reference', got {self.backend!r}")
        return self.backend == "pallas"


DEFAULT_OPTIONS = ForwardOptions()


# ----------------------------------------------------------------------------- params


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of every parameter (the checkpoint contract)."""
    h, hd = config.hidden_size, config.head_dim
    qd, kd, i = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    shapes = {"embed": (config.vocab_size, h), "final_norm": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (h, config.vocab_size)
    per = {"attn_norm": (h,), "mlp_norm": (h,), "wq": (h, qd), "wk": (h, kd), "wv": (h, kd),
           "wo": (qd, h), "w_gate": (h, i), "w_up": (h, i), "w_down": (i, h)}
    if config.attention_bias:
        per.update(bq=(qd,), bk=(kd,), bv=(kd,))
    for n in range(config.num_layers):
        for k, s in per.items():
            shapes[f"layers.{n}.{k}"] = s
    return shapes


def params_from_flat(flat: dict[str, Any], config: LlamaConfig, dtype=jnp.bfloat16) -> Params:
    """Flat dict of arrays (see `expected_shapes`) -> Params on device in `dtype`."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise ValueError(f"params lack {len(missing)} tensors, e.g. {missing[:3]}")
    for name, shape in shapes.items():
        if tuple(flat[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(flat[name].shape)}, config expects {shape}")

    def get(name):
        return jnp.asarray(flat[name], dtype)

    layers = []
    for n in range(config.num_layers):
        def fused(field):
            return jnp.concatenate([get(f"layers.{n}.{f}") for f in FUSED[field]], axis=-1)
        kw = {f: get(f"layers.{n}.{f}") for f in UNFUSED}
        kw.update(wqkv=fused("wqkv"), w_gate_up=fused("w_gate_up"))
        if config.attention_bias:
            kw["bqkv"] = fused("bqkv")
        layers.append(LayerParams(**kw))
    return Params(embed=get("embed"), layers=tuple(layers), final_norm=get("final_norm"),
                  lm_head=None if config.tie_word_embeddings else get("lm_head"))


def qkv_sizes(config: LlamaConfig) -> tuple[int, int, int]:
    """Column counts of q, k, v in the fused wqkv."""
    kd = config.num_kv_heads * config.head_dim
    return config.num_heads * config.head_dim, kd, kd


def split_columns(x, sizes):
    """x [..., sum(sizes)] -> pieces [..., size] (the inverse of the fusing concatenation)."""
    ends = np.cumsum(sizes)
    return [x[..., e - n:e] for n, e in zip(sizes, ends)]


def params_to_flat(params: Params, config: LlamaConfig) -> dict[str, Any]:
    """Inverse of `params_from_flat` for dense params (checkpoint names, fused tensors split)."""
    flat = {"embed": params.embed, "final_norm": params.final_norm}
    if params.lm_head is not None:
        flat["lm_head"] = params.lm_head
    sizes = {"wqkv": qkv_sizes(config), "bqkv": qkv_sizes(config),
             "w_gate_up": (config.intermediate_size,) * 2}
    for n, layer in enumerate(params.layers):
        for f in UNFUSED:
            flat[f"layers.{n}.{f}"] = getattr(layer, f)
        for field, names in FUSED.items():
            val = getattr(layer, field)
            if val is not None:
                for name, part in zip(names, split_columns(val, sizes[field])):
                    flat[f"layers.{n}.{name}"] = part
    return flat


def init_random_params(config: LlamaConfig, key, dtype=jnp.float32, scale: float = 0.05) -> Params:
    """Random params with non-trivial norms and biases (for tests and benchmarks)."""
    shapes = expected_shapes(config)
    keys = jax.random.split(key, len(shapes))
    flat = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items())):
        if name.endswith("norm"):
            flat[name] = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            flat[name] = scale * jax.random.normal(k, shape, jnp.float32)
    return params_from_flat(flat, config, dtype)


# ----------------------------------------------------------------------------- layers


def rms_norm(x, weight, eps: float):
    """Like transformers' LlamaRMSNorm: normalize in float32, scale in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def linear(x, w: Weight, opts: ForwardOptions = DEFAULT_OPTIONS, out_dtype=None):
    """x [..., in] @ w [in, out]; w may be a QuantizedWeight (the draft's INT4)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if opts.exact_rows:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        one = dataclasses.replace(opts, exact_rows=False)
        out = jax.lax.map(lambda r: linear(r[None], w, one, out_dtype)[0], rows)
        return out.reshape(*lead, out.shape[-1])
    if isinstance(w, QuantizedWeight):
        if opts.use_pallas():
            from pallas_kernels.int4_matmul import int4_linear

            return int4_linear(x, w, backend="auto", interpret=opts.interpret).astype(out_dtype)
        rows = x.reshape(-1, x.shape[-1])
        y = int4_matmul_reference(rows, w.packed, w.scale, w.minimum, group_size=w.group_size)
        return y.reshape(*x.shape[:-1], -1).astype(out_dtype)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


# The draft's INT4 GEMVs on the Pallas path take the ops around them (RMSNorm before,
# silu * up or the residual add after) into the kernel: a draft step is ~17 kernels per
# layer, a dozen of them small XLA ones of 1-2 us each (docs/benchmarks.md, session 6).
# Everywhere else (dense target weights, the CPU reference, exact_rows) the plain
# composition runs, so the target's numbers never depend on this.


def _fuses(w: Weight, opts: ForwardOptions) -> bool:
    return isinstance(w, QuantizedWeight) and opts.use_pallas() and not opts.exact_rows


def norm_linear(x, norm_weight, eps: float, w: Weight, opts: ForwardOptions, act: str | None = None):
    """linear(rms_norm(x, norm_weight, eps), w), then act ("silu_mul": silu(gate) * up of the
    fused gate | up columns)."""
    if _fuses(w, opts):
        from pallas_kernels.int4_matmul import int4_linear

        return int4_linear(x, w, norm_weight=norm_weight, norm_eps=eps, act=act, interpret=opts.interpret)
    y = linear(rms_norm(x, norm_weight, eps), w, opts)
    if act == "silu_mul":
        gate, up = jnp.split(y, 2, axis=-1)
        y = jax.nn.silu(gate) * up
    return y


def linear_residual(x, w: Weight, residual, opts: ForwardOptions):
    """residual + linear(x, w)."""
    if _fuses(w, opts):
        from pallas_kernels.int4_matmul import int4_linear

        return int4_linear(x, w, residual=residual, interpret=opts.interpret)
    return residual + linear(x, w, opts)


def forward(params: Params, config: LlamaConfig, tokens, positions, cache, *, prefill: bool = False,
            view=None, opts: ForwardOptions = DEFAULT_OPTIONS):
    """Run the transformer over new tokens, writing their K/V into `cache`.

    tokens, positions: int32 [B, T]; positions are absolute (row b's t-th new token).
    prefill=True: the tokens are a prompt starting at position 0 (right padded); attention
      is exact over the prompt and the cache is filled from scratch.
    view: how the cache is read (cache-type specific: target/draft/streaming).
    Returns (hidden [B, T, hidden] after the final norm, cache). Lengths are not changed:
    the caller commits how many tokens count.
    With opts.fixed_rows = R (not prefill) the tokens are padded to R per row: the padding
    repeats the last position (it sees what the last real token sees) and writes its K/V
    into the R - T slots after the real tokens, which the cache must have room for and
    which are rewritten before any real token reads them.
    """
    t_real = tokens.shape[1]
    if opts.fixed_rows and not prefill:
        tokens, positions = pad_token_rows(tokens, positions, opts.fixed_rows)
    x = params.embed[tokens]
    cos, sin = rope_tables(config, positions)
    b, t = tokens.shape
    hd = config.head_dim
    for n, layer in enumerate(params.layers):
        step = not prefill and cache.takes_qkv(opts)
        if (step and opts.fused_projection and _fuses(layer.wqkv, opts)
                and cache.fuses_projection(t, view, x.dtype, layer.wqkv, layer.bqkv)):
            # the draft's projection and the cache writes in one kernel (int4_qkv_to_cache)
            proj = (x, layer.attn_norm, config.rms_norm_eps, layer.wqkv, layer.bqkv)
            attn, cache = cache.attend_qkv(n, None, cos, sin, positions, num_heads=config.num_heads, view=view,
                                           opts=opts, l2_prefetch=_l2_prefetch(layer, opts), projection=proj)
        elif step:  # one kernel for rope, cache writes and query layout
            qkv = _qkv(x, layer, config, opts)
            attn, cache = cache.attend_qkv(n, qkv, cos, sin, positions, num_heads=config.num_heads, view=view,
                                           opts=opts, l2_prefetch=_l2_prefetch(layer, opts))
        else:
            qkv = _qkv(x, layer, config, opts)
            q, k, v = split_columns(qkv, qkv_sizes(config))
            q = apply_rope(q.reshape(b, t, config.num_heads, hd), cos, sin, exact=opts.exact_rows)
            k = apply_rope(k.reshape(b, t, config.num_kv_heads, hd), cos, sin, exact=opts.exact_rows)
            v = v.reshape(b, t, config.num_kv_heads, hd)
            attn, cache = cache.attend(n, q, k, v, positions, prefill=prefill, view=view, opts=opts)
        x = linear_residual(attn.reshape(b, t, -1), layer.wo, x, opts)
        h = norm_linear(x, layer.mlp_norm, config.rms_norm_eps, layer.w_gate_up, opts, act="silu_mul")
        x = linear_residual(h, layer.w_down, x, opts)
    return rms_norm(x, params.final_norm, config.rms_norm_eps)[:, :t_real], cache


def _qkv(x, layer, config: LlamaConfig, opts: ForwardOptions):
    """The layer's q | k | v projections of x (RMSNorm first; the Qwen2 bias added)."""
    qkv = norm_linear(x, layer.attn_norm, config.rms_norm_eps, layer.wqkv, opts)
    return qkv if layer.bqkv is None else qkv + layer.bqkv


def _l2_prefetch(layer, opts: ForwardOptions) -> tuple:
    """The INT4 arrays read after the attention (the o-projection, then gate | up) for the attention
    kernel to prefetch into the L2 cache, up to ForwardOptions.l2_prefetch bytes (the Mosaic
    attention takes them, the others ignore them)."""
    ws = [w for w in (layer.wo, layer.w_gate_up) if _fuses(w, opts)]
    if not opts.l2_prefetch or not ws:
        return ()
    return tuple(a for w in ws for a in (w.scale, w.minimum, w.packed))


def pad_token_rows(tokens, positions, rows: int):
    """Pad tokens / positions [B, T] to [B, rows]: token 0 at the last real position."""
    b, t = tokens.shape
    if t > rows:
        raise ValueError(f"a forward over {t} tokens per row does not fit ForwardOptions(fixed_rows={rows}): "
                         f"use fixed_rows >= {t} (gamma + 1 for speculative decoding)")
    tokens = jnp.pad(tokens, ((0, 0), (0, rows - t)))
    positions = jnp.concatenate([positions, jnp.repeat(positions[:, -1:], rows - t, axis=1)], axis=1)
    return tokens, positions


def lm_logits(params: Params, hidden, opts: ForwardOptions = DEFAULT_OPTIONS):
    """hidden [..., hidden] -> float32 logits [..., vocab].

    With opts.fixed_rows = R, hidden [B, T, hidden] is padded to R rows per sequence for
    the matmul (so a one-token step and a verify pass use one shape); 2-D input is not
    padded (prefill and draft logits, which no exactness argument needs).
    """
    head = params.lm_head if params.lm_head is not None else params.embed.T
    if opts.fixed_rows and hidden.ndim == 3 and hidden.shape[1] < opts.fixed_rows:
        t = hidden.shape[1]
        padded = jnp.pad(hidden, ((0, 0), (0, opts.fixed_rows - t), (0, 0)))
        return linear(padded, head, opts, out_dtype=jnp.float32)[:, :t]
    return linear(hidden, head, opts, out_dtype=jnp.float32)


def gather_rows(x, index):
    """x [B, T, ...], index int [B] -> x[b, index[b]]: [B, ...]."""
    return jnp.take_along_axis(x, index.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


def param_bytes(params) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params)))
