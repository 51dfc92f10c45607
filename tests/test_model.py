"""Model, fp cache and autoregressive decoding: consistency and bad input."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from helpers import LLAMA3_SCALING, random_prompts, tiny_config, tiny_params
from qspec_jax.attention import causal_prefill_attention
from qspec_jax.cache_spec import CacheSpec
from qspec_jax.config import ConfigError, LlamaConfig
from qspec_jax.generate import STOP_EOS, STOP_LENGTH, generate
from qspec_jax.kv_cache import init_cache
from qspec_jax.model import forward, lm_logits, params_from_flat, params_to_flat, expected_shapes

CONFIGS = {
    "gqa": tiny_config(),
    "mha_bias": tiny_config(num_kv_heads=4, attention_bias=True),
    "llama3_tied": tiny_config(rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True),
}


def full_logits(params, cfg, tokens):
    b, t = tokens.shape
    cache = init_cache(cfg, b, t, jnp.float32).with_prompt_lengths(jnp.full((b,), t))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    h, _ = forward(params, cfg, tokens, pos, cache, prefill=True)
    return lm_logits(params, h)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_token_by_token_decode_equals_full_forward(name):
    cfg = CONFIGS[name]
    params = tiny_params(cfg, seed=1)
    toks, _ = random_prompts(np.random.default_rng(0), [23, 23], cfg.vocab_size)
    ref = full_logits(params, cfg, toks)
    # prefill 9 tokens, then feed the rest one at a time, and two at a time
    for step in (1, 2):
        cache = init_cache(cfg, 2, 32, jnp.float32).with_prompt_lengths(jnp.full((2,), 9))
        pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
        h, cache = forward(params, cfg, toks[:, :9], pos, cache, prefill=True)
        got = [lm_logits(params, h)]
        for s in range(9, 23, step):
            e = min(s + step, 23)
            p = jnp.broadcast_to(jnp.arange(s, e), (2, e - s))
            h, cache = forward(params, cfg, toks[:, s:e], p, cache)
            cache = cache.commit(jnp.full((2,), e))
            got.append(lm_logits(params, h))
        got = jnp.concatenate(got, axis=1)
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
        assert np.array_equal(np.argmax(got, -1), np.argmax(ref, -1))


def test_blockwise_prefill_attention_matches_dense():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 45, 6, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 45, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 45, 2, 16)), jnp.float32)
    dense = causal_prefill_attention(q, k, v, block=64, use_cudnn=False)
    blocked = causal_prefill_attention(q, k, v, block=8, use_cudnn=False)
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-5)
    # position 0 attends only to itself: its output is v[0] of its KV head
    np.testing.assert_allclose(dense[:, 0, 0], v[:, 0, 0], rtol=1e-6, atol=1e-6)


def test_batch_of_mixed_lengths_equals_each_prompt_alone():
    cfg = CONFIGS["gqa"]
    params = tiny_params(cfg, seed=2)
    lengths = [17, 5, 11]
    toks, lens = random_prompts(np.random.default_rng(1), lengths, cfg.vocab_size)
    spec = CacheSpec(capacity=64, dtype="float32")
    batch = generate(params, cfg, toks, lens, max_new_tokens=12, cache_spec=spec, eos_ids=())
    for r, n in enumerate(lengths):
        alone = generate(params, cfg, toks[r:r + 1, :n], lens[r:r + 1], max_new_tokens=12, cache_spec=spec,
                         eos_ids=())
        assert np.array_equal(batch.tokens[r], alone.tokens[0]), r


def test_generate_stops_on_eos_per_row():
    cfg = CONFIGS["gqa"]
    params = tiny_params(cfg, seed=2)
    toks, lens = random_prompts(np.random.default_rng(1), [9, 13], cfg.vocab_size)
    spec = CacheSpec(capacity=64, dtype="float32")
    free = generate(params, cfg, toks, lens, max_new_tokens=10, cache_spec=spec, eos_ids=())
    assert list(np.asarray(free.lengths)) == [10, 10]
    assert list(np.asarray(free.stop_reason)) == [STOP_LENGTH, STOP_LENGTH]
    eos = int(free.tokens[0, 3])
    first = int(np.argmax(np.asarray(free.tokens[0]) == eos))
    out = generate(params, cfg, toks, lens, max_new_tokens=10, cache_spec=spec, eos_ids=(eos,))
    assert int(out.lengths[0]) == first + 1 and int(out.stop_reason[0]) == STOP_EOS
    assert np.array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    # the other row is unaffected unless it also meets the token
    row1 = np.asarray(free.tokens[1])
    n1 = int(np.argmax(row1 == eos)) + 1 if (row1 == eos).any() else 10
    assert int(out.lengths[1]) == n1


def test_sampling_filters_reduce_to_greedy():
    from qspec_jax.sampling import SamplingParams

    cfg = CONFIGS["gqa"]
    params = tiny_params(cfg, seed=4)
    toks, lens = random_prompts(np.random.default_rng(5), [7, 12], cfg.vocab_size)
    spec = CacheSpec(capacity=48, dtype="float32")
    greedy = generate(params, cfg, toks, lens, max_new_tokens=8, cache_spec=spec, eos_ids=())
    for sp in (SamplingParams(temperature=1.3, top_k=1), SamplingParams(temperature=0.9, top_p=1e-6)):
        out = generate(params, cfg, toks, lens, max_new_tokens=8, cache_spec=spec, eos_ids=(), sampling=sp,
                       rng=jax.random.PRNGKey(7))
        assert np.array_equal(out.tokens, greedy.tokens)
    hot = generate(params, cfg, toks, lens, max_new_tokens=8, cache_spec=spec, eos_ids=(),
                   sampling=SamplingParams(temperature=5.0), rng=jax.random.PRNGKey(7))
    assert not np.array_equal(hot.tokens, greedy.tokens)


def test_top_p_keeps_smallest_set_reaching_p():
    from qspec_jax.sampling import SamplingParams, filtered_logits

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.7)))) & (
        np.asarray(filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))) > -1e29)
    assert kept.tolist() == [[True, True, False, False]]
    k2 = np.asarray(filtered_logits(logits, SamplingParams(temperature=1.0, top_k=3))) > -1e29
    assert k2.tolist() == [[True, True, True, False]]


def test_prompt_that_does_not_fit_fails_before_compiling():
    cfg = CONFIGS["gqa"]
    params = tiny_params(cfg)
    toks, lens = random_prompts(np.random.default_rng(0), [30], cfg.vocab_size)
    with pytest.raises(ValueError, match="exceeds the cache length 32"):
        generate(params, cfg, toks, lens, max_new_tokens=3, cache_spec=CacheSpec(capacity=32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, cfg, toks, lens, max_new_tokens=0, cache_spec=CacheSpec(capacity=64))
    small = tiny_config(max_position_embeddings=31)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(tiny_params(small), small, toks, lens, max_new_tokens=3, cache_spec=CacheSpec(capacity=64))
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, cfg, toks, jnp.asarray([0]), max_new_tokens=3, cache_spec=CacheSpec(capacity=64))


def test_config_errors_name_the_problem():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert LlamaConfig.from_hf(base).head_dim == 4
    with pytest.raises(ConfigError, match="MistralForCausalLM"):
        LlamaConfig.from_hf({**base, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ConfigError, match="dynamic"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="longrope"):
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LlamaConfig.from_hf({k: v for k, v in base.items() if k != "num_hidden_layers"})
    cfg = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}})
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_theta == 5e5
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_params_flat_round_trip_and_shape_errors():
    cfg = CONFIGS["mha_bias"]
    params = tiny_params(cfg)
    flat = params_to_flat(params, cfg)
    assert set(flat) == set(expected_shapes(cfg))  # checkpoint names: q/k/v and gate/up separate
    again = params_from_flat(flat, cfg, jnp.float32)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), params, again))
    # the fused columns are q | k | v and gate | up, in that order
    qd = cfg.num_heads * cfg.head_dim
    np.testing.assert_array_equal(np.asarray(params.layers[1].wqkv[:, :qd]), np.asarray(flat["layers.1.wq"]))
    np.testing.assert_array_equal(np.asarray(params.layers[1].bqkv[-cfg.num_kv_heads * cfg.head_dim:]),
                                  np.asarray(flat["layers.1.bv"]))
    np.testing.assert_array_equal(np.asarray(params.layers[0].w_gate_up[:, cfg.intermediate_size:]),
                                  np.asarray(flat["layers.0.w_up"]))
    bad = dict(flat)
    bad["layers.1.wq"] = bad["layers.1.wq"][:, :-1]
    with pytest.raises(ValueError, match="layers.1.wq"):
        params_from_flat(bad, cfg)
    missing = dict(flat)
    del missing["layers.0.bk"]
    with pytest.raises(ValueError, match="lack"):
        params_from_flat(missing, cfg)


def test_fp_cache_length_is_aligned_from_1024_tokens():
    """Long fp caches round their length up to CAPACITY_ALIGN (an unaligned length made XLA copy
    the whole K cache of every layer at every decode step on the GPU); short ones stay exact."""
    from qspec_jax.kv_cache import CAPACITY_ALIGN

    cfg = tiny_config()
    assert CAPACITY_ALIGN % 256 == 0
    assert init_cache(cfg, 1, 1500, jnp.float32).capacity == 2048
    assert init_cache(cfg, 1, 2048, jnp.float32).capacity == 2048
    assert init_cache(cfg, 1, 40, jnp.float32).capacity == 40
