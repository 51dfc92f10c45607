"""Drafts saved beside their target checkpoint: round trip, refusal of a foreign draft, bytes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, tiny_params
from qspec_jax import draft_io
from qspec_jax.cache_spec import CacheSpec
from qspec_jax.draft import DraftRecipe, make_draft
from qspec_jax.draft_io import (DraftMismatchError, draft_dir, get_or_make_draft, load_draft, parse_recipe,
                                recipe_tag, save_draft, target_fingerprint, weight_bytes_report)
from qspec_jax.model import forward, lm_logits
from qspec_jax.quant_weights import QuantizedWeight

CFG = tiny_config(vocab_size=128)
TARGET = tiny_params(CFG, seed=0)
RECIPE = DraftRecipe(group_size=32)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(2, 12)), jnp.int32)


def logits_of(params):
    b, t = TOKENS.shape
    cache = CacheSpec(capacity=t, kind="fp", dtype="float32").init(CFG, b).with_prompt_lengths(
        jnp.full((b,), t, jnp.int32))
    hidden, _ = forward(params, CFG, TOKENS, jnp.broadcast_to(jnp.arange(t), (b, t)), cache, prefill=True)
    return np.asarray(lm_logits(params, hidden))


def leaves(p):
    return jax.tree_util.tree_leaves(p)


def test_recipe_tags():
    for r in (DraftRecipe(), DraftRecipe(group_size=64, scope="mlp", method="gptq"),
              DraftRecipe(group_size=128, quantize_lm_head=False)):
        assert parse_recipe(recipe_tag(r)) == r
    assert recipe_tag(DraftRecipe(group_size=64, scope="mlp")) == "rtn-mlp-g64"
    assert parse_recipe("GPTQ-all-g128-fphead") == DraftRecipe(method="gptq", quantize_lm_head=False)
    for bad in ("rtn-all", "awq-all-g128", "rtn-attn-g128", "rtn-all-g7"):
        with pytest.raises(ValueError):
            parse_recipe(bad)


def test_round_trip(tmp_path):
    draft = make_draft(TARGET, RECIPE)
    path = save_draft(tmp_path, draft, RECIPE, target_params=TARGET, config=CFG)
    assert path == draft_dir(tmp_path, RECIPE).absolute() and (path / "metadata.json").is_file()
    loaded = load_draft(tmp_path, TARGET, CFG, RECIPE)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(draft)
    for a, b in zip(leaves(loaded), leaves(draft)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(logits_of(loaded), logits_of(draft))
    assert load_draft(tmp_path, TARGET, CFG, DraftRecipe(group_size=16)) is None  # another recipe: absent


def test_foreign_draft_is_refused(tmp_path):
    save_draft(tmp_path, make_draft(TARGET, RECIPE), RECIPE, target_params=TARGET, config=CFG)
    other = tiny_params(CFG, seed=1)
    with pytest.raises(DraftMismatchError, match="another model"):
        load_draft(tmp_path, other, CFG, RECIPE)
    with pytest.raises(DraftMismatchError, match="another model"):
        get_or_make_draft(tmp_path, other, CFG, RECIPE)
    # the fingerprint ignores the dtype the target was loaded in
    assert target_fingerprint(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), TARGET), CFG) == \
        target_fingerprint(TARGET, CFG)
    with pytest.raises(ValueError, match="draft"):
        target_fingerprint(make_draft(TARGET, RECIPE), CFG)


def test_save_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="no INT4"):
        save_draft(tmp_path, TARGET, RECIPE, target_params=TARGET, config=CFG)
    with pytest.raises(ValueError, match="fingerprint"):
        save_draft(tmp_path, make_draft(TARGET, RECIPE), RECIPE)
    with pytest.raises(ValueError, match="does not match recipe"):
        save_draft(tmp_path, make_draft(TARGET, RECIPE), DraftRecipe(group_size=32, scope="mlp"),
                   target_params=TARGET, config=CFG)


def test_get_or_make_draft_saves_then_loads(tmp_path, monkeypatch):
    d1 = get_or_make_draft(tmp_path, TARGET, CFG, RECIPE)
    assert (draft_dir(tmp_path, RECIPE) / "metadata.json").is_file()

    real = draft_io.make_draft

    def no_quantizing(params, recipe, quantizer=None):
        if quantizer is None:
            raise AssertionError("should have loaded the saved draft")
        return real(params, recipe, quantizer=quantizer)

    monkeypatch.setattr(draft_io, "make_draft", no_quantizing)
    d2 = get_or_make_draft(tmp_path, TARGET, CFG, RECIPE)
    for a, b in zip(leaves(d1), leaves(d2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gptq_draft_is_recalibrated_on_other_tokens(tmp_path):
    recipe = DraftRecipe(group_size=32, scope="mlp", method="gptq", quantize_lm_head=False)
    rng = np.random.default_rng(0)
    c1 = rng.integers(0, 128, size=(2, 16)).astype(np.int32)
    c2 = rng.integers(0, 128, size=(2, 16)).astype(np.int32)
    with pytest.raises(ValueError, match="calibration"):
        get_or_make_draft(tmp_path, TARGET, CFG, recipe)
    d1 = get_or_make_draft(tmp_path, TARGET, CFG, recipe, c1)
    assert load_draft(tmp_path, TARGET, CFG, recipe) is not None
    assert load_draft(tmp_path, TARGET, CFG, recipe, calibration={"tokens": "x", "shape": [2, 16]}) is None
    d2 = get_or_make_draft(tmp_path, TARGET, CFG, recipe, c2)
    assert not np.array_equal(np.asarray(d1.layers[0].w_gate_up.packed), np.asarray(d2.layers[0].w_gate_up.packed))
    assert not isinstance(d2.lm_head, QuantizedWeight) and not isinstance(d2.layers[0].wqkv, QuantizedWeight)


def test_weight_bytes_report():
    cfg = tiny_config(vocab_size=128, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    target = tiny_params(cfg)
    full = weight_bytes_report(target, make_draft(target, DraftRecipe(group_size=32)), dense_itemsize=2)
    mlp = weight_bytes_report(target, make_draft(target, DraftRecipe(group_size=32, scope="mlp")), dense_itemsize=2)
    h, i, v, n_layers = 64, 128, 128, 2
    per_layer = 2 * h + h * 64 + 2 * h * 32 + 64 * h + 3 * h * i  # norms, q, k, v, o, mlp (tiny head dims)
    assert full["target_read_per_step"] == 2 * (n_layers * per_layer + h + v * h)  # + final norm + tied head
    assert full["target_stored"] == full["target_read_per_step"]  # tied embedding: one matrix
    # an INT4 g32 weight: half a byte per value + 4 bytes (fp16 scale + min) per 32 values
    q_mlp = n_layers * 3 * h * i * (0.5 + 4 / 32)
    assert mlp["draft_extra_stored"] == q_mlp + v * h * (0.5 + 4 / 32)
    assert full["draft_read_per_step"] < mlp["draft_read_per_step"] < mlp["target_read_per_step"]
    assert 0 < full["draft_read_ratio"] < 0.4
    f32 = weight_bytes_report(target)
    assert f32["target_read_per_step"] == 2 * full["target_read_per_step"]


def test_old_format_and_layout_are_refused_with_rebuild_hint(tmp_path):
    """v1 drafts (the N-major INT4 layout) and arrays not in the K-major layout are refused by
    load_draft; get_or_make_draft rebuilds a v1 draft where it can."""
    path = save_draft(tmp_path, make_draft(TARGET, RECIPE), RECIPE, target_params=TARGET, config=CFG)
    assert load_draft(tmp_path, TARGET, CFG, RECIPE) is not None
    mfile = path / "metadata.json"
    d = json.loads(mfile.read_text())
    assert d["metadata"]["format"] == draft_io.DRAFT_FORMAT == "qspec-jax-draft-v2"
    d["metadata"]["format"] = "qspec-jax-draft-v1"
    mfile.write_text(json.dumps(d))
    with pytest.raises(DraftMismatchError, match=r"old on-disk format 'qspec-jax-draft-v1'.*rebuild"):
        load_draft(tmp_path, TARGET, CFG, RECIPE)
    gptq = DraftRecipe(group_size=32, scope="mlp", method="gptq")
    gpath = save_draft(tmp_path, make_draft(TARGET, DraftRecipe(group_size=32, scope="mlp")), gptq,
                       target_params=TARGET, config=CFG)
    (gpath / "metadata.json").write_text((gpath / "metadata.json").read_text().replace(
        draft_io.DRAFT_FORMAT, "qspec-jax-draft-v1"))
    with pytest.raises(DraftMismatchError, match="rebuild"):  # GPTQ without calibration tokens: cannot rebuild
        get_or_make_draft(tmp_path, TARGET, CFG, gptq)
    with pytest.warns(UserWarning, match="old on-disk format.*rebuilding"):  # RTN: rebuilt and overwritten
        rebuilt = get_or_make_draft(tmp_path, TARGET, CFG, RECIPE)
    assert json.loads(mfile.read_text())["metadata"]["format"] == draft_io.DRAFT_FORMAT
    for a, b in zip(leaves(rebuilt), leaves(load_draft(tmp_path, TARGET, CFG, RECIPE))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    d = json.loads(mfile.read_text())
    d["metadata"]["format"] = "something-else"
    mfile.write_text(json.dumps(d))
    with pytest.raises(DraftMismatchError, match="not a qspec-jax draft"):
        load_draft(tmp_path, TARGET, CFG, RECIPE)
    # v2 metadata over arrays in the old [n_groups*G/2, out] layout
    d["metadata"]["format"] = draft_io.DRAFT_FORMAT
    mfile.write_text(json.dumps(d))
    flat, meta = draft_io.load_pytree(path)
    old = {}
    for key, a in flat.items():
        if key.endswith(".packed"):
            a = a.transpose(1, 2, 0).reshape(-1, a.shape[0])
        elif key.endswith((".scale", ".minimum")):
            a = a.T
        old[key] = a
    draft_io.save_pytree(path, old, meta, overwrite=True)
    with pytest.raises(DraftMismatchError, match=r"stores packed \(\d+, \d+\),.*layout.*rebuild"):
        load_draft(tmp_path, TARGET, CFG, RECIPE)
