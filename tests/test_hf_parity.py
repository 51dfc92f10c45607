"""Logits and greedy tokens against Hugging Face transformers' PyTorch model (float32).

The reference outputs were made by tests/reference/make_reference.py (torch +
transformers) and are stored under tests/data, so this suite needs no torch.
Stated tolerance: max |logit difference| <= 2e-4 * max |logit| (float32, different
summation orders), and greedy argmax identical.
"""

from pathlib import Path

import numpy as np
import jax.numpy as jnp
import pytest

from qspec_jax.cache_spec import CacheSpec
from qspec_jax.convert import load_source
from qspec_jax.generate import generate
from qspec_jax.kv_cache import init_cache
from qspec_jax.model import forward, lm_logits, params_from_flat

DATA = Path(__file__).parent / "data"
TINY = sorted(p.name for p in (DATA / "tiny").iterdir() if p.is_dir())
REL_TOL = 2e-4


def run_logits(params, cfg, ids):
    b, t = ids.shape
    cache = init_cache(cfg, b, t, jnp.float32).with_prompt_lengths(jnp.full((b,), t))
    h, _ = forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), (b, t)), cache, prefill=True)
    return np.asarray(lm_logits(params, h))


def assert_close(got, want):
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= REL_TOL, f"max relative logit error {err:.2e}"
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_all_reference_configs_present():
    assert set(TINY) >= {"llama_gqa", "llama_mha", "llama3_rope", "linear_rope", "yarn_rope", "tied",
                         "qwen2_bias", "odd_sizes"}


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_matches_transformers(name):
    cfg, flat, _ = load_source(DATA / "tiny" / name, progress=False, with_tokenizer=False)
    params = params_from_flat(flat, cfg, jnp.float32)
    ref = np.load(DATA / "tiny" / name / "reference.npz")
    assert_close(run_logits(params, cfg, ref["input_ids"]), ref["logits"])
    if "long_input_ids" in ref:  # positions past original_max_position_embeddings
        got = run_logits(params, cfg, ref["long_input_ids"])[:, ref["long_positions"]]
        assert_close(got, ref["long_logits"])
    n = int(ref["greedy_prompt_len"])
    ids = jnp.asarray(ref["input_ids"][:, :n])
    out = generate(params, cfg, ids, jnp.full((2,), n), max_new_tokens=16,
                   cache_spec=CacheSpec(64, "fp", "float32"), eos_ids=())
    np.testing.assert_array_equal(np.asarray(out.tokens), ref["greedy"])


@pytest.mark.smollm2
def test_smollm2_matches_transformers(smollm2_checkpoint):
    from qspec_jax.checkpoint import load_checkpoint

    cfg, flat, _ = load_checkpoint(smollm2_checkpoint)
    params = params_from_flat(flat, cfg, jnp.float32)
    ref = np.load(DATA / "smollm2_reference.npz")
    lengths = ref["lengths"]
    ids = np.where(ref["input_ids_padded"] < 0, 0, ref["input_ids_padded"]).astype(np.int32)
    logits = run_logits(params, cfg, ids)
    for r, n in enumerate(lengths):
        got = logits[r, ref["last_positions"][r]]
        assert_close(got, ref["last_logits"][r])
        np.testing.assert_array_equal(logits[r, :n].argmax(-1), ref["prompt_argmax"][r, :n])
    # 32 greedy tokens, batch of mixed lengths, continuing past EOS as the reference did
    out = generate(params, cfg, jnp.asarray(ids), jnp.asarray(lengths), max_new_tokens=32,
                   cache_spec=CacheSpec(96, "fp", "float32"), eos_ids=())
    np.testing.assert_array_equal(np.asarray(out.tokens), ref["greedy"])
