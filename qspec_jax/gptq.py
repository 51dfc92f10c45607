"""GPTQ (Frantar et al., 2022) for the draft's INT4 asymmetric group-wise weights.

Per linear weight W [in, out] (our layout: `x @ W`), with H = 2 X^T X the Hessian of
the layer-wise loss ||X W - X W_q||^2 over calibration inputs X [n, in]:
  * inputs that never fire (H_ii = 0) get weight 0; H += 1% of mean(diag H) on the diagonal;
  * U = upper Cholesky factor of H^-1;
  * input rows are quantized one at a time in natural order (no act-order), in lazy
    blocks of 128: each row's rounding error, divided by U_ii, is spread over the rows
    not yet quantized (inside the block at once, beyond it once per block);
  * groups of G consecutive input rows: the group's scale and minimum are chosen when
    its first row comes up, from the CURRENT (already error-updated) weights of the
    group (`static_groups=False` in the reference code), with exactly the rule of
    `quant_weights.quantize_rtn` (min/max, fp16 statistics), so the codes pack with
    `pack_weight` and dequantize to the values GPTQ used for its error feedback.
    (The reference code reads a mid-block group's weights before the block's in-block
    updates; here they are read after them, the values the rows are then quantized with.)

Calibration is SEQUENTIAL (as GPTQ's reference llama script with --true-sequential):
the model is run layer by layer over the calibration tokens; each weight's Hessian
comes from inputs produced by the already-quantized layers before it, and inside a
layer q/k/v, then o, then gate/up, then down are quantized in that order, each after
the weights feeding its input. `sequential=False` gives parallel calibration instead
(every Hessian from the full-precision target's activations, one pass).

The math runs in numpy (float32 updates, float64 factorizations) on the host; the
calibration forward runs in JAX, in sub-batches, accumulating X^T X so activations are
never stored beyond one layer.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.attention import causal_prefill_attention
from qspec_jax.config import LlamaConfig
from qspec_jax.draft import ATTN_WEIGHTS, MLP_WEIGHTS, DraftRecipe, make_draft
from qspec_jax.model import Params, qkv_sizes, rms_norm, split_columns
from qspec_jax.quant_weights import QuantizedWeight, check_group_size, dequantize_weight, pack_weight
from qspec_jax.rope import apply_rope, rope_tables

__all__ = ["gptq_quantize", "gptq_codes", "make_gptq_draft", "collect_hessians_dense"]

_F16 = np.float16


# ----------------------------------------------------------------------------- the algorithm


def _group_stats(grp: np.ndarray):
    """Rows of one group [g, out] -> (scale f16 [out], minimum f16 [out]): quantize_rtn's rule."""
    mn = grp.min(axis=0).astype(_F16)
    mx = grp.max(axis=0)
    s = ((mx - mn.astype(np.float32)) / np.float32(15.0)).astype(_F16)
    return s, mn


def _quant_row(w: np.ndarray, s32: np.ndarray, safe: np.ndarray, mn32: np.ndarray):
    code = np.rint(np.clip((w - mn32) / safe, 0, 15))
    code = np.where(s32 > 0, code, 0)
    return code.astype(np.uint8), code.astype(np.float32) * s32 + mn32


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = h^-1 (what GPTQ's cholesky -> cholesky_inverse ->
    cholesky(upper) computes), from one Cholesky factorization and one triangular inverse:
    with J the reversal permutation and J h J = L L^T, U = J L^-1 J."""
    from scipy.linalg import solve_triangular

    rev = h[::-1, ::-1]
    lower = np.linalg.cholesky(rev)
    linv = solve_triangular(lower, np.eye(h.shape[0]), lower=True)
    return np.ascontiguousarray(linv[::-1, ::-1])


def gptq_codes(w, hessian, group_size: int = 128, *, block: int = 128, percdamp: float = 0.01):
    """GPTQ of w [in, out] with hessian [in, in] (any positive multiple of X^T X).

    -> (codes uint8 [n_groups*G, out] with zero-padded ragged tail, scale f16 [n_groups, out],
        minimum f16 [n_groups, out], dequantized float32 [in, out]).
    """
    check_group_size(group_size)
    if block < 1:
        raise ValueError(f"GPTQ block must be >= 1, got {block}")
    W = np.array(w, dtype=np.float32, copy=True)
    k, n = W.shape
    H = np.array(hessian, dtype=np.float64, copy=True)
    if H.shape != (k, k):
        raise ValueError(f"hessian has shape {H.shape}, weight has {k} input rows")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    damp = percdamp * float(np.mean(np.diag(H)))
    H[np.diag_indices(k)] += damp
    try:
        Hinv = _upper_cholesky_of_inverse(H)
    except np.linalg.LinAlgError:
        raise ValueError("GPTQ: the damped Hessian is not positive definite (too few calibration "
                         "tokens or non-finite activations?)") from None
    Hinv = Hinv.astype(np.float32)

    ng = -(-k // group_size)
    codes = np.zeros((ng * group_size, n), np.uint8)
    scale = np.zeros((ng, n), _F16)
    minimum = np.zeros((ng, n), _F16)
    deq = np.zeros((k, n), np.float32)
    s32 = safe = mn32 = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            if r % group_size == 0:
                end = min(r + group_size, k)
                grp = W1[i:end - i1] if end <= i2 else np.concatenate([W1[i:], W[i2:end]], axis=0)
                s, mn = _group_stats(grp)
                scale[r // group_size], minimum[r // group_size] = s, mn
                s32, mn32 = s.astype(np.float32), mn.astype(np.float32)
                safe = np.where(s32 > 0, s32, np.float32(1.0))
            w_row = W1[i]
            c, q = _quant_row(w_row, s32, safe, mn32)
            codes[r], deq[r] = c, q
            err = (w_row - q) / Hinv1[i, i]
            if i + 1 < i2 - i1:
                W1[i + 1:] -= np.outer(Hinv1[i, i + 1:], err)
            Err1[i] = err
        if i2 < k:
            W[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    return codes, scale, minimum, deq


def gptq_quantize(w, hessian, group_size: int = 128, *, block: int = 128, percdamp: float = 0.01) -> QuantizedWeight:
    """GPTQ of w [in, out] -> QuantizedWeight (the layout of `quantize_rtn`)."""
    codes, scale, minimum, _ = gptq_codes(w, hessian, group_size, block=block, percdamp=percdamp)
    return pack_weight(jnp.asarray(codes), scale, minimum, int(np.shape(w)[0]), group_size)


# ----------------------------------------------------------------------------- calibration forward


def _dense(w):
    return dequantize_weight(w) if isinstance(w, QuantizedWeight) else jnp.asarray(w, jnp.float32)


@jax.jit
def _xtx(a):
    a2 = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
    return jnp.dot(a2.T, a2, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("config",))
def _attn_input(x, norm, *, config):
    return rms_norm(x, norm, config.rms_norm_eps)


@functools.partial(jax.jit, static_argnames=("config",))
def _attention(h, wqkv, bqkv, *, config):
    """Attention over the calibration rows (all tokens real, positions 0..T-1) -> [N, T, heads*D]."""
    n, t, _ = h.shape
    hd = config.head_dim
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    cos, sin = rope_tables(config, pos)
    q, k, v = split_columns(h @ wqkv + bqkv, qkv_sizes(config))
    q = q.reshape(n, t, config.num_heads, hd)
    k = k.reshape(n, t, config.num_kv_heads, hd)
    v = v.reshape(n, t, config.num_kv_heads, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return causal_prefill_attention(q, k, v, block=512).reshape(n, t, -1)


@functools.partial(jax.jit, static_argnames=("config",))
def _post_attn(x, a, wo, norm, *, config):
    x2 = x + a @ wo
    return x2, rms_norm(x2, norm, config.rms_norm_eps)


@jax.jit
def _act(hm, w_gate_up):
    gate, up = jnp.split(hm @ w_gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


@jax.jit
def _post_mlp(x2, act, w_down):
    return x2 + act @ w_down


def _split(tokens: np.ndarray, batch: int) -> list[np.ndarray]:
    n = tokens.shape[0]
    return [tokens[i:i + batch] for i in range(0, n, batch)]


def make_gptq_draft(params: Params, config: LlamaConfig, calib_tokens, recipe: DraftRecipe, *,
                    sequential: bool = True, block: int = 128, percdamp: float = 0.01, batch: int = 4,
                    progress: Callable[[str], None] | None = None) -> Params:
    """Target params -> draft params whose INT4 weights come from GPTQ.

    calib_tokens: int32 [N, T] calibration text (all tokens real). recipe.method must be
    "gptq"; its scope / group size / lm_head choice are honoured as in `make_draft`.
    sequential: calibrate each weight on inputs produced by the quantized weights before it
      (default) or on the full-precision target's activations (False).
    batch: calibration rows per forward (memory: ~batch*T*(intermediate + heads*T/...) floats).
    progress: called with a short message after each layer.
    """
    if recipe.method != "gptq":
        raise ValueError(f"make_gptq_draft needs a recipe with method='gptq', got {recipe.method!r}")
    calib = np.asarray(calib_tokens)
    if calib.ndim != 2 or calib.size == 0:
        raise ValueError(f"calib_tokens must be a non-empty int array [N, T], got shape {calib.shape}")
    if calib.min() < 0 or calib.max() >= config.vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {config.vocab_size})")
    if len(params.layers) != config.num_layers:
        raise ValueError(f"params have {len(params.layers)} layers, config {config.num_layers}")
    names = set(recipe.weight_names())
    g = recipe.group_size
    t0 = time.time()
    quantized: dict[tuple[str, int], QuantizedWeight] = {}

    def quant(name, i, w, hess):
        qw = gptq_quantize(np.asarray(w, np.float32), hess, g, block=block, percdamp=percdamp)
        quantized[(name, i)] = qw
        return dequantize_weight(qw) if sequential else jnp.asarray(w, jnp.float32)

    embed = jnp.asarray(params.embed, jnp.float32)
    xs = [embed[jnp.asarray(c, jnp.int32)] for c in _split(calib, batch)]
    zqkv = jnp.zeros((sum(qkv_sizes(config)),), jnp.float32)
    for i, layer in enumerate(params.layers):
        w = {f: _dense(getattr(layer, f)) for f in ATTN_WEIGHTS + MLP_WEIGHTS}
        bqkv = zqkv if layer.bqkv is None else jnp.asarray(layer.bqkv, jnp.float32)
        attn_norm = jnp.asarray(layer.attn_norm, jnp.float32)
        mlp_norm = jnp.asarray(layer.mlp_norm, jnp.float32)
        hs = [_attn_input(x, attn_norm, config=config) for x in xs]
        if "wqkv" in names:
            w["wqkv"] = quant("wqkv", i, w["wqkv"], sum(np.asarray(_xtx(h), np.float64) for h in hs))
        attn = [_attention(h, w["wqkv"], bqkv, config=config) for h in hs]
        del hs
        if "wo" in names:
            w["wo"] = quant("wo", i, w["wo"], sum(np.asarray(_xtx(a), np.float64) for a in attn))
        post = [_post_attn(x, a, w["wo"], mlp_norm, config=config) for x, a in zip(xs, attn)]
        del attn
        if "w_gate_up" in names:
            w["w_gate_up"] = quant("w_gate_up", i, w["w_gate_up"],
                                   sum(np.asarray(_xtx(hm), np.float64) for _, hm in post))
        acts = [_act(hm, w["w_gate_up"]) for _, hm in post]
        if "w_down" in names:
            w["w_down"] = quant("w_down", i, w["w_down"], sum(np.asarray(_xtx(a), np.float64) for a in acts))
        xs = [_post_mlp(x2, a, w["w_down"]) for (x2, _), a in zip(post, acts)]
        del post, acts
        if progress is not None:
            progress(f"GPTQ layer {i + 1}/{config.num_layers} ({time.time() - t0:.0f}s)")
    if recipe.quantize_lm_head:
        final_norm = jnp.asarray(params.final_norm, jnp.float32)
        hess = sum(np.asarray(_xtx(_attn_input(x, final_norm, config=config)), np.float64) for x in xs)
        head = params.embed.T if params.lm_head is None else params.lm_head
        quantized[("lm_head", -1)] = gptq_quantize(np.asarray(head, np.float32), hess, g, block=block,
                                                   percdamp=percdamp)
        if progress is not None:
            progress(f"GPTQ lm_head ({time.time() - t0:.0f}s)")

    def lookup(name, i, w):
        return quantized[(name, i)]

    return make_draft(params, recipe, quantizer=lookup)


def collect_hessians_dense(params: Params, config: LlamaConfig, calib_tokens, *, batch: int = 4) -> dict:
    """X^T X of every linear input of the full-precision model (parallel calibration;
    diagnostics and tests). -> {("qkv"|"wo"|"mlp_in"|"w_down", layer) or ("lm_head", -1): array}."""
    out = {}
    xs = [jnp.asarray(params.embed, jnp.float32)[jnp.asarray(c, jnp.int32)]
          for c in _split(np.asarray(calib_tokens), batch)]
    zqkv = jnp.zeros((sum(qkv_sizes(config)),), jnp.float32)
    for i, layer in enumerate(params.layers):
        w = {f: _dense(getattr(layer, f)) for f in ATTN_WEIGHTS + MLP_WEIGHTS}
        bqkv = zqkv if layer.bqkv is None else layer.bqkv
        hs = [_attn_input(x, layer.attn_norm, config=config) for x in xs]
        out[("qkv", i)] = sum(np.asarray(_xtx(h), np.float64) for h in hs)
        attn = [_attention(h, w["wqkv"], bqkv, config=config) for h in hs]
        out[("wo", i)] = sum(np.asarray(_xtx(a), np.float64) for a in attn)
        post = [_post_attn(x, a, w["wo"], layer.mlp_norm, config=config) for x, a in zip(xs, attn)]
        out[("mlp_in", i)] = sum(np.asarray(_xtx(hm), np.float64) for _, hm in post)
        acts = [_act(hm, w["w_gate_up"]) for _, hm in post]
        out[("w_down", i)] = sum(np.asarray(_xtx(a), np.float64) for a in acts)
        xs = [_post_mlp(x2, a, w["w_down"]) for (x2, _), a in zip(post, acts)]
    out[("lm_head", -1)] = sum(np.asarray(_xtx(_attn_input(x, params.final_norm, config=config)), np.float64)
                               for x in xs)
    return out
