"""GPTQ for the draft's INT4 group-wise weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, tiny_params
from qspec_jax.cache_spec import CacheSpec
from qspec_jax.draft import DraftRecipe, make_draft
from qspec_jax.gptq import gptq_codes, gptq_quantize, make_gptq_draft
from qspec_jax.model import forward, lm_logits
from qspec_jax.quant_weights import QuantizedWeight, dequantize_weight, quantize_rtn, unpack_codes


def correlated_inputs(rng, n, k):
    """Activations with strongly correlated channels and uneven scales (like real ones)."""
    z = rng.standard_normal((n, k // 4)).astype(np.float32)
    mix = rng.standard_normal((k // 4, k)).astype(np.float32)
    x = z @ mix + 0.1 * rng.standard_normal((n, k)).astype(np.float32)
    return x * rng.uniform(0.2, 3.0, size=(1, k)).astype(np.float32)


@pytest.mark.parametrize("k,group", [(96, 32), (100, 32), (72, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(k, group):
    rng = np.random.default_rng(k)
    x = correlated_inputs(rng, 512, k)
    w = rng.standard_normal((k, 40)).astype(np.float32)
    h = 2 * x.T.astype(np.float64) @ x
    codes, scale, minimum, deq = gptq_codes(w, h, group, block=32)
    qw = gptq_quantize(w, h, group, block=32)
    # packing round trip: the stored weights are exactly the values GPTQ fed back
    np.testing.assert_array_equal(np.asarray(dequantize_weight(qw)), deq)
    c = np.asarray(unpack_codes(qw))
    assert c.max() <= 15 and c.shape == (-(-k // group) * group, 40)
    assert np.all(c[k:] == 0)  # ragged tail padded with zero codes
    assert qw.shape == (k, 40) and qw.scale.dtype == jnp.float16
    err_gptq = np.linalg.norm(x @ w - x @ deq)
    err_rtn = np.linalg.norm(x @ w - x @ np.asarray(dequantize_weight(quantize_rtn(w, group))))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_diagonal_hessian_reduces_to_round_to_nearest():
    """With uncorrelated inputs there is nothing to compensate: GPTQ == RTN exactly."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((80, 24)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 80))
    qg = gptq_quantize(w, h, 32, block=16)
    qr = quantize_rtn(w, 32)
    np.testing.assert_array_equal(np.asarray(qg.packed), np.asarray(qr.packed))
    np.testing.assert_array_equal(np.asarray(qg.scale), np.asarray(qr.scale))
    np.testing.assert_array_equal(np.asarray(qg.minimum), np.asarray(qr.minimum))


def test_dead_inputs_and_bad_hessian():
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 64, 32)
    x[:, 5] = 0.0  # an input that never fires
    w = rng.standard_normal((32, 8)).astype(np.float32)
    _, _, _, deq = gptq_codes(w, x.T @ x, 16)
    assert np.all(np.isfinite(deq))
    with pytest.raises(ValueError, match="hessian has shape"):
        gptq_codes(w, np.eye(31), 16)
    with pytest.raises(ValueError, match="group size"):
        gptq_codes(w, np.eye(32), 15)


CFG = tiny_config(vocab_size=128, hidden_size=64, intermediate_size=96)


def teacher_forced_logits(params, tokens):
    b, t = tokens.shape
    cache = CacheSpec(capacity=t, kind="fp", dtype="float32").init(CFG, b).with_prompt_lengths(
        jnp.full((b,), t, jnp.int32))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _ = forward(params, CFG, tokens, pos, cache, prefill=True)
    return lm_logits(params, hidden)


@pytest.mark.parametrize("scope", ["all", "mlp"])
def test_gptq_draft_is_closer_to_the_target_than_rtn(scope):
    target = tiny_params(CFG, seed=3, scale=0.3)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, CFG.vocab_size, size=(8, 64)).astype(np.int32)
    held = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(4, 64)).astype(np.int32))
    # group 32 along hidden=64 and a ragged last group along intermediate=96 with 64
    for g in (32, 64):
        gptq = make_gptq_draft(target, CFG, calib, DraftRecipe(group_size=g, scope=scope, method="gptq"), batch=4)
        rtn = make_draft(target, DraftRecipe(group_size=g, scope=scope))
        assert isinstance(gptq.layers[0].w_down, QuantizedWeight)
        assert isinstance(gptq.lm_head, QuantizedWeight)
        assert isinstance(gptq.layers[1].wqkv, QuantizedWeight) == (scope == "all")
        ref = teacher_forced_logits(target, held)
        e_gptq = float(jnp.mean((teacher_forced_logits(gptq, held) - ref) ** 2))
        e_rtn = float(jnp.mean((teacher_forced_logits(rtn, held) - ref) ** 2))
        assert e_gptq < e_rtn, (g, e_gptq, e_rtn)


def test_make_gptq_draft_argument_errors():
    target = tiny_params(CFG, seed=3)
    with pytest.raises(ValueError, match="method='gptq'"):
        make_gptq_draft(target, CFG, np.zeros((2, 8), np.int32), DraftRecipe(group_size=32))
    with pytest.raises(ValueError, match="token ids"):
        make_gptq_draft(target, CFG, np.full((2, 8), 999, np.int32), DraftRecipe(group_size=32, method="gptq"))
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        make_gptq_draft(target, CFG, np.zeros((8,), np.int32), DraftRecipe(group_size=32, method="gptq"))
