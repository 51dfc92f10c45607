"""Acceptance sweeps, the exact replay, perplexity through the cache, the eval CLI's errors."""

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_prompts, tiny_config, tiny_params
from qspec_jax.cache_spec import CacheSpec
from qspec_jax.draft import DraftRecipe, make_draft
from qspec_jax.evaluation import (acceptance_sweep, perplexity, prefill_caches, simulate_rounds, streaming_window,
                                  sweep_specs)
from qspec_jax.generate import prefill_cache
from qspec_jax.model import ForwardOptions, forward, lm_logits

EXACT = ForwardOptions(exact_rows=True, backend="reference")
CFG = tiny_config(vocab_size=128)
TARGET = tiny_params(CFG, seed=0, scale=0.3)
OTHER = tiny_params(CFG, seed=7, scale=0.3)
P, B = 40, 3
PROMPTS = np.asarray(random_prompts(np.random.default_rng(0), [P] * B, CFG.vocab_size)[0])


def _key(r):
    return (r["method"], r["gamma"])


def test_replay_equals_the_loop_exactly():
    """All-gamma replay vs one speculative loop per gamma: identical statistics (exact_rows),
    with groups flushing during decoding (G=16, 40 new tokens) and a mediocre draft."""
    draft = make_draft(TARGET, DraftRecipe(group_size=16))
    kw = dict(drafts={"rtn": draft}, gammas={"rtn": [1, 8], "streaming": [3]}, max_new_tokens=40, kv_group=16, streaming_budget=0.25,
              opts=EXACT)
    specs = sweep_specs(P, 8, 40, kv_group=16)
    pre = prefill_caches(TARGET, CFG, PROMPTS, jnp.full((B,), P, jnp.int32), specs, opts=EXACT)
    loop = acceptance_sweep(TARGET, CFG, PROMPTS, mode="loop", prefilled=pre, specs=specs, **kw)
    replay = acceptance_sweep(TARGET, CFG, PROMPTS, mode="replay", prefilled=pre, specs=specs, **kw)
    assert len(loop) == len(replay) == 3
    by = {_key(r): r for r in loop}
    for r in replay:
        ref = by[_key(r)]
        for k in ("rounds", "accepted", "flushes", "accepted_per_round_hist", "acceptance_rate"):
            assert r[k] == ref[k], (r["method"], r["gamma"], k, r[k], ref[k])
    q = [r for r in replay if r["method"] == "quantspec"]
    assert all(r["flushes"] > 0 for r in q)
    assert 0.0 < q[0]["acceptance_rate"] < 1.0
    s = next(r for r in replay if r["method"] == "streaming")
    assert s["window"] == streaming_window(P, 0.25) == 10 and s["recipe"] == "streaming-w10-s4"


def test_self_draft_accepts_everything_and_a_foreign_draft_does_not():
    """Draft = target weights, and the whole run inside the full-precision buffer (P + new
    tokens < 2G), so the draft's 4-bit view equals the target's: greedy acceptance is 1.
    (Replay mode: the test above shows it equals the loop.)"""
    rows = acceptance_sweep(TARGET, CFG, PROMPTS, drafts={"self": TARGET, "other": OTHER}, gammas=[2, 4],
                            streaming=False, max_new_tokens=20, kv_group=64, mode="replay", opts=EXACT)
    acc = {(r["recipe"], r["gamma"]): r["acceptance_rate"] for r in rows}
    assert acc[("self", 2)] == acc[("self", 4)] == 1.0
    assert acc[("other", 2)] < 0.5 and acc[("other", 4)] < 0.5
    r = next(r for r in rows if r["recipe"] == "self" and r["gamma"] == 4)
    assert r["tokens_per_round"] == 5.0 or r["rounds"] * 5 >= B * 19  # last round truncated


def test_simulate_rounds_counts():
    runs = np.array([[8, 0, 2, 8, 8, 8, 8, 8, 8, 8]])  # one row, max_new 11 -> 10 positions
    s = simulate_rounds(runs, 2, 11, 100, None)
    # L offsets: 0 (n=2, +3) -> 3 (n=2, +3) -> 6 (n=2, +3) -> 9 (n=2, count 1): 4 rounds
    assert s["rounds"] == 4 and s["accepted"] == 8 and s["accepted_per_round_hist"] == [0, 0, 4]
    s = simulate_rounds(runs, 8, 11, 100, 4)
    # 0 (n=8, +9 -> 9) -> 9 (n=8, count 1): 2 rounds; a round that completes a group flushes once
    assert s["rounds"] == 2 and s["accepted"] == 16 and s["flushes"] == 1


def test_sweep_argument_errors():
    with pytest.raises(ValueError, match="gamma"):
        acceptance_sweep(TARGET, CFG, PROMPTS, drafts={"a": TARGET}, gammas=[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="mode"):
        acceptance_sweep(TARGET, CFG, PROMPTS, gammas=[1], mode="fast")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        acceptance_sweep(TARGET, CFG, PROMPTS, streaming=False)
    with pytest.raises(ValueError, match="budget"):
        acceptance_sweep(TARGET, CFG, PROMPTS, gammas=[1], streaming_budget=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        acceptance_sweep(TARGET, tiny_config(vocab_size=128, max_position_embeddings=48), PROMPTS, gammas=[1],
                         max_new_tokens=20)


# ----------------------------------------------------------------------------- perplexity


def full_forward_nll(params, tokens, p):
    b, t = tokens.shape
    cache = CacheSpec(capacity=t, kind="fp", dtype="float32").init(CFG, b).with_prompt_lengths(
        jnp.full((b,), t, jnp.int32))
    hidden, _ = forward(params, CFG, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)), cache,
                        prefill=True)
    lp = jax.nn.log_softmax(lm_logits(params, hidden), -1)
    nll = -np.take_along_axis(np.asarray(lp[:, p - 1:-1]), tokens[:, p:, None], -1)[..., 0]
    return float(nll.mean())


def test_perplexity_fp_matches_a_full_forward_and_int8_is_close():
    toks = np.asarray(random_prompts(np.random.default_rng(3), [P + 30] * B, CFG.vocab_size)[0])
    fp = CacheSpec(capacity=P + 48, kind="fp", dtype="float32", group_size=16, spec_room=16)
    i8 = CacheSpec(capacity=P + 48, kind="int8", dtype="float32", group_size=16, spec_room=16)
    ref = full_forward_nll(TARGET, toks, P)
    r_fp = perplexity(TARGET, CFG, toks, P, fp, block=8)
    assert r_fp["tokens"] == B * 30
    assert abs(r_fp["nll"] - ref) < 1e-4
    assert abs(perplexity(TARGET, CFG, toks, P, fp, block=16)["nll"] - ref) < 1e-4
    r_i8 = perplexity(TARGET, CFG, toks, P, i8, block=8)
    assert r_i8["nll"] != r_fp["nll"]  # groups were quantized
    assert abs(r_i8["ppl"] / r_fp["ppl"] - 1) < 0.02
    assert math.isclose(r_i8["ppl"], math.exp(r_i8["nll"]))
    with pytest.raises(ValueError, match="spec_room"):
        perplexity(TARGET, CFG, toks, P, i8, block=32)
    with pytest.raises(ValueError, match="needs a cache"):
        perplexity(TARGET, CFG, np.concatenate([toks, toks], 1), P, i8, block=8)


def test_shared_prefill_equals_separate_prefills():
    specs = sweep_specs(P, 4, 8, kv_group=16)
    lengths = jnp.full((B,), P, jnp.int32)
    both = prefill_caches(TARGET, CFG, PROMPTS, lengths, specs)
    for kind, spec in specs.items():
        logits, cache = prefill_cache(TARGET, CFG, jnp.asarray(PROMPTS), lengths, cache_spec=spec)
        np.testing.assert_array_equal(np.asarray(both[kind][0]), np.asarray(logits))
        for a, b in zip(jax.tree_util.tree_leaves(both[kind][1]), jax.tree_util.tree_leaves(cache)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- CLI


def _cli():
    path = Path(__file__).resolve().parent.parent / "scripts" / "eval_acceptance.py"
    spec = importlib.util.spec_from_file_location("eval_acceptance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv,msg", [
    (["--recipes", "rtn-all-g32"], "Q4_1"),
    (["--recipes", "awq-all-g128"], "bad draft recipe"),
    (["--gammas", "0"], "gamma must be >= 1"),
    (["--gammas", "x"], "bad --gammas"),
    (["--kv-group", "8", "--gammas", "8"], "must not exceed --kv-group"),
    (["--chunks", "0"], "--chunks"),
    (["--streaming-budget", "1.5"], "streaming-budget"),
    (["--compare-recipes", "rtn-mlp-g64", "--compare-prompt-lens", "999"], "is not one of --prompt-lens"),
    (["--data", "/nonexistent/pg19.jsonl"], "not found"),
    (["--mode", "fast"], "invalid choice"),
    (["--recipes", "best"], "needs --compare-recipes"),
    (["--from-json", "/nonexistent.json"], "not a results file"),
])
def test_cli_argument_errors(argv, msg, capsys):
    cli = _cli()
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ([] if "--data" in argv else ["--data", __file__]))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_cli_gamma_ranges():
    cli = _cli()
    assert cli._gammas(["1..3", "6", "2,8"]) == [1, 2, 3, 6, 8]
