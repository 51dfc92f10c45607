"""The public API (`import qspec_jax`) and the errors a researcher meets.

Every error below must say what to change: the argument to mark static, the cache
capacity to use, how to rebuild a draft. The messages are matched, not just the types.
"""

import dataclasses
import functools
import inspect
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qspec_jax
from helpers import random_prompts, tiny_config, tiny_params
from qspec_jax import (CacheSpec, CacheTooShortError, DraftMismatchError, DraftRecipe, SpecMethod,
                       StaticArgumentError, generate, init_fp_cache, init_hier_cache, load_draft, make_draft,
                       save_draft, speculative_generate)

ROOT = Path(__file__).resolve().parent.parent
CFG = tiny_config(vocab_size=128)
TARGET = tiny_params(CFG, seed=0, scale=0.3)
DRAFT = make_draft(TARGET, DraftRecipe(group_size=16))
INT8 = CacheSpec(capacity=64, kind="int8", dtype="float32", group_size=16, spec_room=5)
TOKS, LENS = random_prompts(np.random.default_rng(0), [10, 7], CFG.vocab_size)

# functions whose arguments or results are token arrays: their docstrings must give dtype and shape
ARRAY_FUNCTIONS = ("encode_prompts", "generate", "speculative_generate", "acceptance_sweep", "perplexity",
                   "prefill_cache", "speculative_from_prefill", "make_gptq_draft", "pg19_chunks")


# ----------------------------------------------------------------------------- the package


def test_import_is_cheap_and_every_public_name_is_documented():
    code = ("import sys, inspect, qspec_jax as q\n"
            "heavy = [m for m in ('jax', 'pallas_kernels', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "for n in q.__all__:\n"
            "    assert inspect.getdoc(getattr(q, n)), n\n"
            "print(len(q.__all__))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(qspec_jax.__all__) >= 30


def test_all_names_resolve_with_their_own_docstrings():
    missing = [n for n in qspec_jax.__all__ if not hasattr(qspec_jax, n)]
    assert not missing
    assert set(qspec_jax.__all__) <= set(dir(qspec_jax))
    for name in qspec_jax.__all__:
        obj = getattr(qspec_jax, name)
        doc = inspect.getdoc(obj) or ""
        # a dataclass without a docstring gets its signature as __doc__: not documentation
        assert len(doc) > 30 and not doc.startswith(f"{name}("), (name, doc[:80])
    for name in ARRAY_FUNCTIONS:
        doc = inspect.getdoc(getattr(qspec_jax, name))
        assert "int32" in doc and re.search(r"\[[A-Za-z_]+, ", doc), (name, doc)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qspec_jax.nope  # noqa: B018


def test_generate_is_the_function_not_the_submodule():
    import qspec_jax.speculative  # noqa: F401  (imports the qspec_jax.generate submodule)

    assert callable(qspec_jax.generate) and inspect.isfunction(qspec_jax.generate)
    assert qspec_jax.generate is sys.modules["qspec_jax.generate"].generate
    from qspec_jax.generate import check_fits  # the module's other names stay importable

    assert callable(check_fits)


def test_cache_bytes_without_allocating():
    for spec in (CacheSpec(256, "fp", "float16"), CacheSpec(256, "int8", "float16", group_size=64, spec_room=8)):
        assert spec.nbytes(CFG, batch=2) == spec.init(CFG, 2).nbytes
    fp = init_fp_cache(CFG, 2, 256, "float16")
    assert fp.nbytes == CacheSpec(256, "fp", "float16").nbytes(CFG, 2) == 2 * 2 * 2 * 2 * 256 * 16 * 2
    cfg = tiny_config(head_dim=64, num_heads=2, num_kv_heads=1)  # SmolLM2's head_dim
    hier = init_hier_cache(cfg, 1, 32768, group_size=128, spec_room=8, dtype=jnp.float16)
    # 8-bit codes (half the fp16 bytes) + fp16 statistics + a 272-token fp16 buffer
    ratio = hier.nbytes / CacheSpec(32768, "fp", "float16").nbytes(cfg, 1)
    assert 0.5 < ratio < 0.55, ratio


# ----------------------------------------------------------------------------- static arguments


def test_traced_gamma_names_the_argument_and_static_argnames():
    run = jax.jit(lambda g: speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=g, max_new_tokens=8,
                                                 cache_spec=INT8))
    with pytest.raises(StaticArgumentError, match=r"gamma is a traced value.*static_argnames=\('gamma'"):
        run(3)
    with pytest.raises(TypeError, match="static"):  # StaticArgumentError is a TypeError
        run(3)


def test_traced_max_new_tokens_names_the_argument():
    run = jax.jit(lambda n: generate(TARGET, CFG, TOKS, LENS, max_new_tokens=n, cache_spec=INT8))
    with pytest.raises(StaticArgumentError, match=r"generate: max_new_tokens is a traced.*static_argnames"):
        run(8)
    run = jax.jit(lambda n: speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=2, max_new_tokens=n,
                                                 cache_spec=INT8))
    with pytest.raises(StaticArgumentError, match=r"speculative_generate: max_new_tokens is a traced"):
        run(8)


def test_traced_cache_spec_and_its_fields_are_named():
    run = jax.jit(lambda t, l, cache_spec: generate(TARGET, CFG, t, l, max_new_tokens=4, cache_spec=cache_spec))
    with pytest.raises(StaticArgumentError, match=r"cache_spec is a traced value.*static_argnames=\('cache_spec'"):
        run(TOKS, LENS, INT8)
    run = jax.jit(lambda cap: generate(TARGET, CFG, TOKS, LENS, max_new_tokens=4, cache_spec=CacheSpec(cap)))
    with pytest.raises(StaticArgumentError, match=r"CacheSpec: capacity is a traced value"):
        run(64)
    with pytest.raises(StaticArgumentError, match="eos_ids is a traced value"):
        jax.jit(lambda e: generate(TARGET, CFG, TOKS, LENS, max_new_tokens=4, cache_spec=INT8, eos_ids=e))(
            jnp.asarray([1, 2]))
    with pytest.raises(StaticArgumentError, match="window is a traced value"):
        jax.jit(lambda w: SpecMethod.streaming(w))(8)
    with pytest.raises(StaticArgumentError, match="gamma must be a Python int.*got float"):
        speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=2.0, max_new_tokens=4, cache_spec=INT8)


def test_jitted_wrapper_with_static_argnames_matches_the_direct_call():
    """The docs/api.md pattern: speculative_generate inside the caller's jax.jit, lengths traced."""
    static = ("config", "gamma", "max_new_tokens", "cache_spec")

    @functools.partial(jax.jit, static_argnames=static)
    def run(target, draft, tokens, lengths, *, config, gamma, max_new_tokens, cache_spec):
        out = speculative_generate(target, draft, config, tokens, lengths, gamma=gamma,
                                   max_new_tokens=max_new_tokens, cache_spec=cache_spec, eos_ids=())
        return out.tokens, out.stats

    tokens, stats = run(TARGET, DRAFT, TOKS, LENS, config=CFG, gamma=3, max_new_tokens=12, cache_spec=INT8)
    ref = speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=3, max_new_tokens=12, cache_spec=INT8,
                               eos_ids=())
    np.testing.assert_array_equal(tokens, ref.tokens)
    assert stats.summary(3) == ref.stats.summary(3)
    # under jit the cache check uses the padded width (10) for the traced lengths
    with pytest.raises(CacheTooShortError, match=r"padded prompt width 10 \(lengths are traced\) \+ "
                                                 r"max_new_tokens=60 \+ 4 speculative slots \(gamma \+ 1\) = 74 "
                                                 r"exceeds the cache length 64: use CacheSpec\(capacity=74"):
        run(TARGET, DRAFT, TOKS, LENS, config=CFG, gamma=3, max_new_tokens=60, cache_spec=INT8)


# ----------------------------------------------------------------------------- cache too short


def test_cache_too_short_gives_the_numbers_and_the_capacity_to_use():
    fp = CacheSpec(capacity=48, kind="fp", dtype="float32", spec_room=5)
    with pytest.raises(CacheTooShortError, match=r"prompt of 10 tokens \+ max_new_tokens=40 = 50 exceeds the "
                                                 r"cache length 48: use CacheSpec\(capacity=50, \.\.\.\) or "
                                                 r"larger, or max_new_tokens <= 38"):
        generate(TARGET, CFG, TOKS, LENS, max_new_tokens=40, cache_spec=fp)
    with pytest.raises(CacheTooShortError, match=r"prompt of 10 tokens \+ max_new_tokens=60 \+ 5 speculative "
                                                 r"slots \(gamma \+ 1\) = 75 exceeds the cache length 64: use "
                                                 r"CacheSpec\(capacity=75, \.\.\.\) or larger, or "
                                                 r"max_new_tokens <= 49"):
        speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=4, max_new_tokens=60, cache_spec=INT8)
    assert issubclass(CacheTooShortError, ValueError)
    wide = jnp.zeros((2, 70), jnp.int32)
    with pytest.raises(CacheTooShortError, match=r"padded prompt width 70 exceeds the cache length 64.*"
                                                 r"capacity=79"):
        generate(TARGET, CFG, wide, LENS, max_new_tokens=9, cache_spec=INT8)


def test_spec_room_and_group_size_say_what_to_change():
    with pytest.raises(ValueError, match=r"spec_room >= gamma \+ 1 = 6.*replace\(cache_spec, spec_room=6\)"):
        speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=5, max_new_tokens=4, cache_spec=INT8)
    wide_room = dataclasses.replace(INT8, spec_room=16)
    with pytest.raises(ValueError, match=r"gamma=16: .* group size 16: use gamma <= 15 or "
                                         r"CacheSpec\(group_size=18 or larger, spec_room=17\)"):
        speculative_generate(TARGET, DRAFT, CFG, TOKS, LENS, gamma=16, max_new_tokens=4, cache_spec=wide_room)
    with pytest.raises(ValueError, match=r"spec_room=20 must not exceed the KV group size 16"):
        CacheSpec(64, "int8", group_size=16, spec_room=20)
    with pytest.raises(ValueError, match=r"kind 'fp'.*replace\(cache_spec, kind='fp'\)"):
        speculative_generate(TARGET, TARGET, CFG, TOKS, LENS, gamma=2, max_new_tokens=4, cache_spec=INT8,
                             method=SpecMethod.streaming(8))


# ----------------------------------------------------------------------------- drafts of another model


def test_draft_of_other_shapes_says_to_rebuild_it():
    other = tiny_params(tiny_config(vocab_size=128, num_layers=3))
    with pytest.raises(DraftMismatchError, match=r"draft has 3 layers, target 2.*make_draft\(target_params"):
        speculative_generate(TARGET, other, CFG, TOKS, LENS, gamma=2, max_new_tokens=4, cache_spec=INT8)
    wide = tiny_params(tiny_config(vocab_size=128, intermediate_size=64))
    with pytest.raises(DraftMismatchError, match=r"w_gate_up has shape \(64, 128\), target \(64, 192\).*rebuild"):
        speculative_generate(TARGET, wide, CFG, TOKS, LENS, gamma=2, max_new_tokens=4, cache_spec=INT8)


def test_draft_of_another_model_with_the_same_shapes_warns():
    other = make_draft(tiny_params(CFG, seed=5, scale=0.3), DraftRecipe(group_size=16))
    with pytest.warns(UserWarning, match=r"another model\?.*make_draft"):  # (the compilation of the test above)
        out = speculative_generate(TARGET, other, CFG, TOKS, LENS, gamma=3, max_new_tokens=12, cache_spec=INT8,
                                   eos_ids=())
    assert out.stats.summary(3)["acceptance_rate"] < 0.5


def test_stale_draft_on_disk_says_to_delete_and_rebuild(tmp_path):
    recipe = DraftRecipe(group_size=16)
    save_draft(tmp_path, DRAFT, recipe, target_params=TARGET, config=CFG)
    other = tiny_params(CFG, seed=3)
    stale = str(tmp_path / "drafts" / "rtn-all-g16")
    with pytest.raises(DraftMismatchError, match=r"another model.*Delete the stale draft directory "
                                                 + re.escape(stale) + r".*get_or_make_draft"):
        load_draft(tmp_path, other, CFG, recipe)
