"""Speculative decoding: the lossless property, sampling correctness, bad input.

Exactness design: greedy speculative decoding must equal greedy autoregressive decoding
over the same hierarchical INT8 cache token for token. A verify pass computes gamma+1
tokens at once, and XLA's CPU matmul may round a [T, K] @ [K, N] row differently from
a [1, K] @ [K, N] product (measured: up to 1.6e-4 apart). `ForwardOptions(exact_rows=True)`
computes token-wise contractions one token at a time, so in float32 on CPU the two
decoders see bitwise-identical numbers and the comparison is exact, with no tolerance.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from helpers import random_prompts, tiny_config, tiny_params
from qspec_jax.cache_spec import CacheSpec
from qspec_jax.draft import DraftRecipe, make_draft
from qspec_jax.generate import STOP_EOS, generate
from qspec_jax.model import ForwardOptions
from qspec_jax.sampling import SamplingParams
from qspec_jax.speculative import SpecMethod, speculative_generate

EXACT = ForwardOptions(exact_rows=True, backend="reference")
CFG = tiny_config(vocab_size=128)
TARGET = tiny_params(CFG, seed=0, scale=0.3)
DRAFT = make_draft(TARGET, DraftRecipe(group_size=16))
G = 16
WIDTH = 40  # padded prompt width: fixed so examples share compilations
MAX_NEW = 100  # >= 6 flushes of a 16-token group per row
INT8 = CacheSpec(capacity=160, kind="int8", dtype="float32", group_size=G, spec_room=9)

_ar_cache = {}


def ar_reference(tokens, lengths):
    key = (np.asarray(tokens).tobytes(), np.asarray(lengths).tobytes())
    if key not in _ar_cache:
        _ar_cache[key] = generate(TARGET, CFG, tokens, lengths, max_new_tokens=MAX_NEW, cache_spec=INT8,
                                  eos_ids=(), opts=EXACT)
    return _ar_cache[key]


lengths_st = st.lists(st.one_of(st.integers(1, WIDTH), st.sampled_from([16, 32])), min_size=3, max_size=3)


# The example is session 7's counterexample (scripts/repro_cpu_exact_gap.py): a near-tie of
# 4.4e-4 in the INT8 target's logits at position 129 (row 2) flipped because the two programs
# rounded rope and the buffer's attention sums differently (docs/design.md, "Exactness on CPU").
# derandomize keeps CI deterministic (a landing must not depend on a draw); the randomized,
# logits-level check over many more cases is scripts/sweep_cpu_exactness.py.
@settings(max_examples=11, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(gamma=st.integers(1, 8), lengths=lengths_st, seed=st.integers(0, 2**16))
@example(gamma=1, lengths=[1, 1, 33], seed=264)
def test_greedy_speculative_equals_autoregressive_int8(gamma, lengths, seed):
    toks, lens = random_prompts(np.random.default_rng(seed), lengths, CFG.vocab_size, WIDTH)
    ref = ar_reference(toks, lens)
    out = speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=gamma, max_new_tokens=MAX_NEW,
                               cache_spec=INT8, eos_ids=(), opts=EXACT)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert list(np.asarray(out.lengths)) == [MAX_NEW] * 3
    assert np.all(np.asarray(out.stats.flushes) >= 5)


@pytest.mark.parametrize("gamma", [1, 8])
def test_every_gamma_with_a_poor_draft_is_still_lossless(gamma):
    """A draft from other weights is mostly rejected: exercises rollback on every round."""
    other = tiny_params(CFG, seed=99, scale=0.3)
    toks, lens = random_prompts(np.random.default_rng(gamma), [40, 7, 23], CFG.vocab_size, WIDTH)
    ref = ar_reference(toks, lens)
    out = speculative_generate(TARGET, other, CFG, toks, lens, gamma=gamma, max_new_tokens=MAX_NEW,
                               cache_spec=INT8, eos_ids=(), opts=EXACT)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    summary = out.stats.summary(gamma)
    assert summary["acceptance_rate"] < 0.5
    assert sum(summary["accepted_per_round_hist"]) == summary["rounds"]


FIXED = ForwardOptions(fixed_rows=9, backend="reference")  # the GPU exact mode: one shape for every target forward


def test_fixed_rows_makes_a_verify_pass_bitwise_equal_to_one_token_steps():
    """Without exact_rows, fixed_rows alone makes a T-token forward give the logits of T
    jitted one-token steps bit for bit (unpadded they differ by ~1e-6: XLA's [T, K] dots);
    this is what makes the mode exact on the GPU, where exact_rows is too slow."""
    # hidden 256: XLA's CPU dot rounds [1, 256] @ W and row i of [T, 256] @ W differently
    # (at K = 64, as in CFG, it does not), so this fails if any matmul goes unpadded
    cfg = tiny_config(vocab_size=512, hidden_size=256, intermediate_size=512, head_dim=32, num_heads=8)
    ver, steps = verify_pass_and_steps(tiny_params(cfg, seed=3, scale=0.15), cfg, FIXED, ForwardOptions())
    np.testing.assert_array_equal(np.asarray(ver), np.asarray(steps))


def verify_pass_and_steps(params, cfg, opts, prefill_opts):
    """Target logits [3, 6, vocab] of 6 fed tokens, from one jitted 6-token verify pass and from
    6 jitted one-token steps with commits (two separately compiled programs, as the two decoders
    are). Rows: 30 + 6 and 40 + 6 tokens cross a group boundary, so the steps flush in between."""
    from qspec_jax.generate import prefill_cache
    from qspec_jax.hier_cache import TARGET as TARGET_VIEW
    from qspec_jax.model import forward, lm_logits

    toks, lens = random_prompts(np.random.default_rng(7), [30, 15, 40], cfg.vocab_size, WIDTH)
    feed = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (3, 6)), jnp.int32)
    _, cache0 = prefill_cache(params, cfg, toks, lens, cache_spec=INT8, opts=prefill_opts)

    @jax.jit
    def verify(cache, feed):
        pos = cache.lengths[:, None] + jnp.arange(feed.shape[1])
        return lm_logits(params, forward(params, cfg, feed, pos, cache, view=TARGET_VIEW, opts=opts)[0], opts)

    @jax.jit
    def step(cache, tok):
        h, cache = forward(params, cfg, tok, cache.lengths[:, None], cache, view=TARGET_VIEW, opts=opts)
        return lm_logits(params, h, opts)[:, 0], cache.commit(cache.lengths + 1)

    ver = verify(cache0, feed)
    cache, steps = cache0, []
    for i in range(feed.shape[1]):
        logits, cache = step(cache, feed[:, i:i + 1])
        steps.append(logits)
    return ver, jnp.stack(steps, axis=1)


def test_exact_rows_verify_pass_bitwise_equals_one_token_steps_across_a_flush():
    """Two separately jitted programs, as the two decoders are: a 6-token verify pass and 6
    one-token steps with commits (row 0, 30 + 6 tokens, crosses a group boundary, so the steps
    flush in between). Failed before the two fixes: every logit differed in the last bits
    (rope's FMA contraction), then positions 32..35 of row 0 (the buffer read at another offset)."""
    ver, steps = verify_pass_and_steps(TARGET, CFG, EXACT, EXACT)
    np.testing.assert_array_equal(np.asarray(ver), np.asarray(steps))


@pytest.mark.parametrize("gamma", [2, 8])
def test_greedy_speculative_equals_autoregressive_with_fixed_rows(gamma):
    toks, lens = random_prompts(np.random.default_rng(10 + gamma), [37, 5, 16], CFG.vocab_size, WIDTH)
    ref = generate(TARGET, CFG, toks, lens, max_new_tokens=MAX_NEW, cache_spec=INT8, eos_ids=(), opts=FIXED)
    out = speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=gamma, max_new_tokens=MAX_NEW,
                               cache_spec=INT8, eos_ids=(), opts=FIXED)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert np.all(np.asarray(out.stats.flushes) >= 5)


def test_self_draft_accepts_everything():
    toks, lens = random_prompts(np.random.default_rng(1), [30, 12, 40], CFG.vocab_size, WIDTH)
    fp = CacheSpec(capacity=160, kind="fp", dtype="float32", spec_room=9)
    # the target as its own draft over the full cache view: acceptance must be exactly 1
    method = SpecMethod("self", None, None, "fp")
    out = speculative_generate(TARGET, TARGET, CFG, toks, lens, gamma=4, max_new_tokens=41, cache_spec=fp,
                               method=method, eos_ids=(), opts=EXACT)
    s = out.stats.summary(4)
    assert s["acceptance_rate"] == 1.0 and s["tokens_per_round"] == 5.0


@pytest.mark.parametrize("opts,seed", [(EXACT, 3), (FIXED, 5)], ids=["exact_rows", "fixed_rows"])
def test_streaming_llm_self_speculation_is_lossless_against_fp(opts, seed):
    """With fixed_rows the padding is written past the committed length of the fp cache and
    the StreamingLLM draft runs unpadded: still exact."""
    fp = CacheSpec(capacity=160, kind="fp", dtype="float32", spec_room=9)
    toks, lens = random_prompts(np.random.default_rng(seed), [40, 9, 33], CFG.vocab_size, WIDTH)
    ref = generate(TARGET, CFG, toks, lens, max_new_tokens=60, cache_spec=fp, eos_ids=(), opts=opts)
    out = speculative_generate(TARGET, TARGET, CFG, toks, lens, gamma=3, max_new_tokens=60, cache_spec=fp,
                               method=SpecMethod.streaming(window=8, sink=2), eos_ids=(), opts=opts)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert out.stats.summary(3)["acceptance_rate"] < 1.0  # the window really limits the draft


def test_eos_stops_rows_where_autoregressive_stops():
    toks, lens = random_prompts(np.random.default_rng(4), [40, 18, 5], CFG.vocab_size, WIDTH)
    free = ar_reference(toks, lens)
    eos = int(free.tokens[1, 30])
    ref = generate(TARGET, CFG, toks, lens, max_new_tokens=MAX_NEW, cache_spec=INT8, eos_ids=(eos,), opts=EXACT)
    out = speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=5, max_new_tokens=MAX_NEW, cache_spec=INT8,
                               eos_ids=(eos,), opts=EXACT)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.stop_reason, ref.stop_reason)
    assert int(out.stop_reason[1]) == STOP_EOS and int(out.lengths[1]) <= 31
    for r in range(3):
        n = int(ref.lengths[r])
        np.testing.assert_array_equal(out.tokens[r, :n], ref.tokens[r, :n])


def test_speculative_sampling_preserves_the_target_distribution():
    """Chi-square test of the joint law of the first two sampled tokens (alpha = 0.001).

    With a draft of other weights most proposals are rejected, so both acceptance and the
    residual max(p - q, 0) path carry weight. Exact probabilities come from the target.
    """
    from qspec_jax.kv_cache import init_cache
    from qspec_jax.model import forward, lm_logits
    from qspec_jax.sampling import probabilities

    cfg = tiny_config(vocab_size=6, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48)
    target = tiny_params(cfg, seed=1, scale=0.6)
    draft = tiny_params(cfg, seed=2, scale=0.6)
    sp = SamplingParams(temperature=1.0)
    prompt = jnp.asarray([[1, 4, 2, 5, 3]], jnp.int32)
    n = 6000
    fp = CacheSpec(capacity=16, kind="fp", dtype="float32", spec_room=4)
    toks = jnp.repeat(prompt, n, 0)
    lens = jnp.full((n,), 5, jnp.int32)
    out = speculative_generate(target, draft, cfg, toks, lens, gamma=2, max_new_tokens=3, cache_spec=fp,
                               method=SpecMethod("self", None, None, "fp"), sampling=sp,
                               rng=jax.random.PRNGKey(11), eos_ids=())
    pairs = np.asarray(out.tokens[:, 1]) * cfg.vocab_size + np.asarray(out.tokens[:, 2])
    counts = np.bincount(pairs, minlength=cfg.vocab_size ** 2)

    # exact joint of (token 2, token 3) given the first sampled token x1: p(x2|x1) p(x3|x1,x2),
    # averaged over the observed x1 of each sample
    def probs_after(seq):
        c = init_cache(cfg, 1, 16, jnp.float32).with_prompt_lengths(jnp.asarray([len(seq)]))
        h, _ = forward(target, cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None], c, prefill=True)
        return np.asarray(probabilities(lm_logits(target, h[:, -1]), sp))[0]

    x1 = np.asarray(out.tokens[:, 0])
    expected = np.zeros(cfg.vocab_size ** 2)
    for a in range(cfg.vocab_size):
        m = int(np.sum(x1 == a))
        if m == 0:
            continue
        p2 = probs_after([1, 4, 2, 5, 3, a])
        for b in range(cfg.vocab_size):
            p3 = probs_after([1, 4, 2, 5, 3, a, b])
            expected[b * cfg.vocab_size: (b + 1) * cfg.vocab_size] += m * p2[b] * p3
    keep = expected > 5
    chi2 = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile (z = 3.090)
    crit = dof * (1 - 2 / (9 * dof) + 3.090 * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, dof, crit)
    assert out.stats.summary(2)["acceptance_rate"] < 0.9


def test_bad_gamma_and_mismatched_draft_are_named():
    toks, lens = random_prompts(np.random.default_rng(0), [10], CFG.vocab_size)
    kw = dict(max_new_tokens=10, cache_spec=INT8)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=0, **kw)
    with pytest.raises(ValueError, match="spec_room"):
        speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=9, **kw)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda g: speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=g, **kw))(3)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=4, max_new_tokens=150, cache_spec=INT8)
    other_cfg = tiny_config(vocab_size=128, num_layers=3)
    with pytest.raises(ValueError, match="made from this target"):
        speculative_generate(TARGET, tiny_params(other_cfg), CFG, toks, lens, gamma=2, **kw)
    with pytest.raises(ValueError, match=r"fixed_rows=4\) is smaller than the 6 tokens"):
        speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=5, opts=ForwardOptions(fixed_rows=4), **kw)
    with pytest.raises(ValueError, match="spec_room=9: use dataclasses.replace"):
        generate(TARGET, CFG, toks, lens, opts=ForwardOptions(fixed_rows=12), **kw)
    with pytest.raises(ValueError, match="fixed_rows must be an int >= 0"):
        ForwardOptions(fixed_rows=-1)
    with pytest.raises(ValueError, match=r"padded slots \(ForwardOptions.fixed_rows\)"):
        generate(TARGET, CFG, toks, lens, max_new_tokens=145, cache_spec=INT8, opts=ForwardOptions(fixed_rows=9))
    with pytest.raises(ValueError, match="kind 'int8'"):
        speculative_generate(TARGET, DRAFT, CFG, toks, lens, gamma=2, max_new_tokens=10,
                             cache_spec=CacheSpec(64, "fp"))


def test_fixed_rows_pads_lm_logits_like_a_verify_pass():
    """lm_logits over [B, 1, H] and over [B, 6, H] use one [B*R, H] matmul shape with
    fixed_rows, so the first token's logits agree bit for bit (at H = 512 XLA's CPU dot
    rounds M = 1 and M = 6 differently; measured)."""
    from qspec_jax.model import Params, lm_logits

    rng = np.random.default_rng(0)
    head = jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32)
    params = Params(embed=jnp.zeros((1024, 512)), layers=(), final_norm=jnp.ones((512,)), lm_head=head)
    hidden = jnp.asarray(rng.standard_normal((1, 6, 512)), jnp.float32)
    fixed = ForwardOptions(fixed_rows=8, backend="reference")
    one, six = (jax.jit(lambda h: lm_logits(params, h, fixed))(h) for h in (hidden[:, :1], hidden))
    np.testing.assert_array_equal(np.asarray(one[:, 0]), np.asarray(six[:, 0]))
