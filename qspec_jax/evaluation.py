"""Acceptance and perplexity on real text (the paper's PG-19 protocol).

`acceptance_sweep`: a batch of prompt chunks is prefilled ONCE (one forward fills both the
hierarchical INT8 cache and the full-precision cache), then the jitted speculative loop
(`speculative_from_prefill`) runs from that prefilled cache for every gamma and method:
  QuantSpec   INT4 draft weights (a recipe) + the 4-bit view of the hierarchical cache;
  StreamingLLM the target's own weights reading sink + a recent window of the fp cache
              (window = budget x prompt length, MagicDec-style self-speculation).
Greedy decoding, no early stop at EOS (every row generates max_new_tokens), so every
method is measured on the same number of tokens.

Two ways to get the per-gamma statistics (`mode`):
  "loop"    run `speculative_from_prefill` once per gamma (one compilation per gamma);
  "replay"  exact replay for ALL gammas from two passes. With greedy acceptance the output
            is the target's greedy sequence t whatever gamma is, and the cache state at the
            start of a round depends only on the committed length L (committed target K/V;
            complete groups quantized; slots past L are rewritten before they are read). So
            a round starting at L accepts min(a(L), gamma) drafts, where a(L) is the number
            of consecutive draft predictions, run from the state at L, that match t. Pass 1
            decodes t with the target (greedy, one token per step); pass 2 walks L through
            the continuation, runs the draft from each state up to max(gamma) steps
            (stopping once every row has missed), and advances the target by one token.
            Simulating the rounds on a(L) then gives, for every gamma, the same rounds,
            accepted tokens, histogram and flushes as the loop: bitwise with
            `ForwardOptions(exact_rows=True)` (tested), otherwise up to the float rounding
            by which a verify pass over gamma+1 tokens differs from one-token steps (the
            same rounding that makes the loop's own runs at different gammas differ at
            exact near-ties). Cost: about 2 target steps + (longest run in the batch + 1)
            draft steps per generated token for all gammas together, against the sum over
            gammas of (gamma + 1) / tokens_per_round steps per token, and two compilations
            instead of one per gamma.

`perplexity`: prefill a prefix exactly, then score the next tokens teacher-forced in
blocks through the cache's decode path (forward at absolute positions, then commit), so
every scored token reads the cache (quantized or full precision) exactly as decoding
would; the hierarchical cache's view depends only on the query position, so the block
size does not change what a token sees.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.cache_spec import CacheSpec
from qspec_jax.config import LlamaConfig
from qspec_jax.generate import check_fits, prefill, prefill_cache
from qspec_jax.model import DEFAULT_OPTIONS, ForwardOptions, Params, forward, lm_logits
from qspec_jax.quant_weights import QuantizedWeight, dequantize_weight
from qspec_jax.sampling import GREEDY
from qspec_jax.speculative import SpecMethod, speculative_from_prefill, validate_gamma

STREAMING = "streaming"
_STAT_KEYS = ("acceptance_rate", "tokens_per_round", "rounds", "accepted", "flushes", "accepted_per_round_hist")
QUANTSPEC = "quantspec"


# ----------------------------------------------------------------------------- shared prefill


@flax.struct.dataclass
class _DualCache:
    """Prefill-only cache that fills a full-precision and a hierarchical cache from one
    forward (the prompt's K/V are computed once; attention once, exactly)."""

    fp: object
    hier: object

    def with_prompt_lengths(self, lengths):
        return _DualCache(self.fp.with_prompt_lengths(lengths), self.hier.with_prompt_lengths(lengths))

    def attend(self, layer, q, k, v, positions, *, prefill, view=None, opts):
        if not prefill:
            raise ValueError("_DualCache only prefills")
        out, fp = self.fp.attend(layer, q, k, v, positions, prefill=True, view=None, opts=opts)
        lc = self.hier._fill_from_prompt(self.hier.layers[layer], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        return out, _DualCache(fp, self.hier.with_layer(layer, lc))


@functools.partial(jax.jit, static_argnames=("config", "fp_spec", "int8_spec", "opts"))
def _prefill_dual(params, config, tokens, lengths, *, fp_spec, int8_spec, opts):
    b = tokens.shape[0]
    cache = _DualCache(fp_spec.init(config, b), int8_spec.init(config, b))
    logits, cache = prefill(params, config, tokens, lengths, cache, opts)
    return logits, cache.fp, cache.hier


def prefill_caches(params: Params, config: LlamaConfig, tokens, lengths, specs: Mapping[str, CacheSpec], *,
                   opts: ForwardOptions = DEFAULT_OPTIONS) -> dict[str, tuple]:
    """Prefill the prompts into one cache per spec: {name: (logits [B, V], cache)}.

    With one "fp" and one "int8" spec, a single forward fills both.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    kinds = {s.kind: n for n, s in specs.items()}
    if len(specs) == 2 and set(kinds) == {"fp", "int8"}:
        try:
            logits, fp, hier = _prefill_dual(params, config, tokens, lengths, fp_spec=specs[kinds["fp"]],
                                             int8_spec=specs[kinds["int8"]], opts=opts)
            return {kinds["fp"]: (logits, fp), kinds["int8"]: (logits, hier)}
        except AttributeError as e:  # the hierarchical cache changed its internals: prefill twice
            warnings.warn(f"shared prefill unavailable ({e}); prefilling each cache", stacklevel=2)
    return {n: prefill_cache(params, config, tokens, lengths, cache_spec=s, opts=opts) for n, s in specs.items()}


# ----------------------------------------------------------------------------- acceptance


def dense_draft(draft: Params) -> Params:
    """The draft with its INT4 weights dequantized to float32 (the same values; the matmul
    runs dense). All recipes then share one compiled loop per gamma; see `acceptance_sweep`."""
    return jax.tree_util.tree_map(lambda x: dequantize_weight(x) if isinstance(x, QuantizedWeight) else x, draft,
                                  is_leaf=lambda x: isinstance(x, QuantizedWeight))


def streaming_window(prompt_len: int, budget: float) -> int:
    if not 0 < budget <= 1:
        raise ValueError(f"streaming budget must be in (0, 1], got {budget}")
    return max(1, int(round(budget * prompt_len)))


def acceptance_sweep(target: Params, config: LlamaConfig, prompts, *, drafts: Mapping[str, Params] | None = None,
                     gammas: Sequence[int] | Mapping[str, Sequence[int]] = tuple(range(1, 9)),
                     streaming: bool = True, max_new_tokens: int = 128, kv_group: int = 128,
                     streaming_budget: float = 0.25, sink: int = 4, cache_dtype: str = "float32",
                     dense_drafts: bool = False, opts: ForwardOptions = DEFAULT_OPTIONS,
                     extra_spec_room: int = 0, prefilled: dict | None = None,
                     specs: Mapping[str, CacheSpec] | None = None, mode: str = "loop",
                     replay_cache: dict | None = None, min_replay_tokens: int = 0,
                     progress: Callable[[str], None] | None = None) -> list[dict]:
    """Acceptance of QuantSpec (one row set per draft) and StreamingLLM on prompts [B, P].

    prompts: int32 [B, P], every row P real tokens (no padding), e.g. `pg19_chunks(...)`.
    Greedy, no stop at EOS: every row generates max_new_tokens.
    drafts: {recipe name: draft params} for QuantSpec (empty: StreamingLLM only).
    gammas: the gammas of every method, or {name: gammas} per draft name / "streaming"
      (names missing from the dict are skipped).
    dense_drafts: run each draft with its INT4 weights dequantized to dense float32 (same
      weight values; only the matmul's summation order differs, so acceptance agrees up
      to float ties; faster on CPU and all recipes share compilations).
    prefilled: {"fp": (logits, cache), "int8": (logits, cache)} from `prefill_caches` with
      `specs` (reuse across calls); built here if None.
    specs: {"fp": CacheSpec, "int8": CacheSpec} of `prefilled` (default: `sweep_specs(...)`);
      the loop must use the specs the caches were prefilled with.
    mode: "loop" (one speculative loop per gamma) or "replay" (all gammas from two passes;
      see the module docstring). Replay shares pass 1 between all drafts of one cache kind.
    replay_cache: a dict kept by the caller across calls on the SAME prefilled caches, so
      pass 1 (the target's tokens) is computed once per cache kind; min_replay_tokens: make
      pass 1 at least this long (max_new_tokens - 1 + max gamma of a later call). It maps
      a cache kind ("int8", "fp") to the target's greedy tokens int32 [B, n] after the
      prompts; tokens you already have from `generate(..., eos_ids=())` over a cache of
      that kind (n >= max_new_tokens - 1 + max gamma) are the same tokens and skip pass 1.
    Returns one dict per (method, recipe, gamma): method, recipe, prompt_len, gamma, chunks,
    max_new_tokens, acceptance_rate, tokens_per_round, rounds, accepted, flushes,
    accepted_per_round_hist, seconds (wall time of the loop, compilation included).
    """
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [B, P], got shape {prompts.shape}")
    b, p = prompts.shape
    if mode not in ("loop", "replay"):
        raise ValueError(f"mode must be 'loop' or 'replay', got {mode!r}")
    drafts = dict(drafts or {})
    names = list(drafts) + ([STREAMING] if streaming else [])
    if not names:
        raise ValueError("nothing to evaluate: no drafts and streaming=False")
    per = {n: tuple(gammas.get(n, ())) for n in names} if isinstance(gammas, Mapping) else \
        {n: tuple(gammas) for n in names}
    all_g = sorted({g for gs in per.values() for g in gs})
    if not all_g:
        raise ValueError("no gammas to evaluate")
    need = (("int8",) if drafts else ()) + (("fp",) if streaming else ())
    if specs is None:
        if prefilled is not None:
            raise ValueError("pass the specs the prefilled caches were made with")
        specs = sweep_specs(p, max(all_g), max_new_tokens, kv_group=kv_group, cache_dtype=cache_dtype,
                            extra_spec_room=extra_spec_room, kinds=need)
    missing = [k for k in need if k not in specs or (prefilled is not None and k not in prefilled)]
    if missing:
        raise ValueError(f"no {missing} cache spec / prefilled cache for the requested methods")
    specs = {k: specs[k] for k in need}
    for g in all_g:
        for s in specs.values():
            validate_gamma(int(g), s)
    lengths = np.full((b,), p, np.int32)
    for s in specs.values():
        check_fits(lengths, max_new_tokens, s.capacity, config, extra=max(all_g) + 1)
    window = streaming_window(p, streaming_budget) if streaming else None
    if prefilled is None:
        t0 = time.time()
        prefilled = prefill_caches(target, config, prompts, lengths, specs, opts=opts)
        jax.block_until_ready(prefilled)
        if progress:
            progress(f"prefill {b}x{p} ({time.time() - t0:.0f}s)")
    rows = []
    rng = jax.random.PRNGKey(0)
    target_toks = {} if replay_cache is None else replay_cache
    n_tok = max(max(1, max_new_tokens - 1) + max(all_g), min_replay_tokens)
    for name in names:
        if not per[name]:
            continue
        if name == STREAMING:
            kind, method, draft = "fp", SpecMethod.streaming(window, sink), target
            label = f"streaming-w{window}-s{sink}"
        else:
            kind, method, draft = "int8", SpecMethod.quantspec(), drafts[name]
            draft = dense_draft(draft) if dense_drafts else draft
            label = name
        base = {"method": QUANTSPEC if name != STREAMING else STREAMING, "recipe": label, "prompt_len": p,
                "chunks": b, "max_new_tokens": max_new_tokens, "mode": mode}
        if name == STREAMING:
            base.update(window=window, sink=sink)
        if mode == "replay":
            t0 = time.time()
            if kind not in target_toks or target_toks[kind].shape[1] < n_tok:
                target_toks[kind] = replay_tokens(target, config, prefilled[kind], method, n_tok + 1 - max(all_g),
                                                  max(all_g), opts=opts)
                jax.block_until_ready(target_toks[kind])
                if progress:
                    progress(f"pass 1: target greedy tokens over the {kind} cache ({time.time() - t0:.0f}s)")
            t1 = time.time()
            gm = max(per[name])
            toks = target_toks[kind][:, :max(1, max_new_tokens - 1) + gm]
            runs = replay_runs(target, draft, config, prefilled[kind], toks, method, max_new_tokens, gm, opts=opts)
            dt = time.time() - t1
            for g in per[name]:
                st = simulate_rounds(runs, int(g), max_new_tokens, p,
                                     specs[kind].group_size if kind == "int8" else None)
                rows.append(dict(base, gamma=int(g), **{k: st[k] for k in _STAT_KEYS}, seconds=round(dt, 1)))
            if progress:
                accs = " ".join(f"{r['acceptance_rate']:.2f}" for r in rows[-len(per[name]):])
                progress(f"run {label} P={p} replay gammas {list(per[name])}: acceptance {accs} ({dt:.0f}s)")
            continue
        logits, cache = prefilled[kind]
        for g in per[name]:
            t0 = time.time()
            out = speculative_from_prefill(target, draft, cache, logits, rng, config=config, gamma=int(g),
                                           max_new_tokens=max_new_tokens, method=method, cache_spec=specs[kind],
                                           sampling=GREEDY, eos_ids=(), opts=opts)
            stats = jax.device_get(out.stats)
            dt = time.time() - t0
            st = stats.summary(int(g))
            rows.append(dict(base, gamma=int(g), **{k: st[k] for k in _STAT_KEYS}, seconds=round(dt, 1)))
            if progress:
                progress(f"run {label} P={p} gamma={g}: acceptance {st['acceptance_rate']:.3f} ({dt:.0f}s)")
    return rows


# ----------------------------------------------------------------------------- exact replay


@functools.partial(jax.jit, static_argnames=("config", "n", "view", "opts"))
def _target_greedy(params, config, cache, logits, *, n, view, opts):
    """Greedy target decoding from a prefilled cache: tokens [B, n] at positions P, P+1, ..."""
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def body(carry, _):
        cache, tok = carry
        pos = cache.lengths
        hidden, cache = forward(params, config, tok[:, None], pos[:, None], cache, view=view, opts=opts)
        nxt = jnp.argmax(lm_logits(params, hidden, opts)[:, 0], axis=-1).astype(jnp.int32)
        return (cache.commit(pos + 1), nxt), tok

    if n == 1:
        return first[:, None]
    (_, last), toks = jax.lax.scan(body, (cache, first), None, length=n - 1)
    return jnp.concatenate([toks.T, last[:, None]], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "n_pos", "gmax", "draft_view", "target_view", "opts"))
def _accept_runs(target, draft, config, cache, toks, *, n_pos, gmax, draft_view, target_view, opts):
    """a [B, n_pos]: a[b, j] = drafts accepted (capped at gmax) by a round starting with
    committed length P + j and last token toks[b, j]. toks [B, n_pos + gmax] from `_target_greedy`."""
    b = toks.shape[0]

    def at(j):
        return jax.lax.dynamic_index_in_dim(toks, j, axis=1, keepdims=False)

    def position(cache, j):
        base = cache.lengths

        def cond(s):
            i, _, alive, _ = s
            return (i < gmax) & jnp.any(alive)

        def step(s):
            i, c, alive, a = s
            hidden, c = forward(draft, config, at(j + i)[:, None], (base + i)[:, None], c, view=draft_view,
                                opts=opts.for_draft())
            pred = jnp.argmax(lm_logits(draft, hidden[:, 0], opts), axis=-1).astype(jnp.int32)
            match = alive & (pred == at(j + i + 1))
            return i + 1, c, match, a + match.astype(jnp.int32)

        init = (jnp.int32(0), cache, jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32))
        _, _, _, a = jax.lax.while_loop(cond, step, init)
        _, cache = forward(target, config, at(j)[:, None], base[:, None], cache, view=target_view, opts=opts)
        return cache.commit(base + 1), a

    _, a = jax.lax.scan(position, cache, jnp.arange(n_pos))
    return a.T


def simulate_rounds(runs, gamma: int, max_new_tokens: int, prompt_len: int, group_size: int | None) -> dict:
    """Rounds of greedy speculative decoding with `gamma` from the accepted-run table
    runs [B, >= max_new_tokens - 1] (`replay_runs`) -> the fields of SpecStats.summary.
    group_size None: no flushes (the full-precision cache)."""
    runs = np.asarray(runs)
    hist = np.zeros(gamma + 1, np.int64)
    rounds = accepted = flushes = 0
    for row in runs:
        n_out, length = 1, prompt_len
        while n_out < max_new_tokens:
            n = int(min(row[length - prompt_len], gamma))
            accepted += n
            rounds += 1
            hist[n] += 1
            count = min(n + 1, max_new_tokens - n_out)
            if group_size is not None and (length + count) // group_size > length // group_size:
                flushes += 1
            n_out += count
            length += count
    return {"gamma": gamma, "rounds": rounds, "accepted": accepted,
            "acceptance_rate": accepted / max(1, gamma * rounds),
            "tokens_per_round": (accepted + rounds) / max(1, rounds), "flushes": flushes,
            "accepted_per_round_hist": [int(x) for x in hist]}


def replay_tokens(target: Params, config: LlamaConfig, prefilled: tuple, method: SpecMethod, max_new_tokens: int,
                  gmax: int, *, opts: ForwardOptions = DEFAULT_OPTIONS):
    """Pass 1 of the replay: the target's greedy tokens [B, max_new_tokens - 1 + gmax]."""
    logits, cache = prefilled
    return _target_greedy(target, config, cache, logits, n=max(1, max_new_tokens - 1) + gmax,
                          view=method.target_view, opts=opts)


def replay_runs(target: Params, draft: Params, config: LlamaConfig, prefilled: tuple, toks, method: SpecMethod,
                max_new_tokens: int, gmax: int, *, opts: ForwardOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Pass 2 of the replay: the accepted-run table [B, max_new_tokens - 1]."""
    _, cache = prefilled
    n_pos = max(1, max_new_tokens - 1)
    return np.asarray(_accept_runs(target, draft, config, cache, toks, n_pos=n_pos, gmax=gmax,
                                   draft_view=method.draft_view, target_view=method.target_view, opts=opts))


def sweep_specs(prompt_len: int, max_gamma: int, max_new_tokens: int, *, kv_group: int = 128,
                cache_dtype: str = "float32", extra_spec_room: int = 0, extra_capacity: int = 0,
                kinds: Sequence[str] = ("int8", "fp")) -> dict[str, CacheSpec]:
    """The cache specs `acceptance_sweep` (and a `perplexity` sharing its prefill) use.

    spec_room = max(max_gamma + 1, extra_spec_room); capacity = prompt + max_new_tokens +
    max_gamma + 1 (or + extra_capacity if larger).
    """
    room = max(max_gamma + 1, extra_spec_room)
    cap = prompt_len + max(max_new_tokens + max_gamma + 1, extra_capacity)
    return {k: CacheSpec(capacity=cap, kind=k, dtype=cache_dtype, group_size=kv_group, spec_room=room)
            for k in kinds}


# ----------------------------------------------------------------------------- perplexity


@functools.partial(jax.jit, static_argnames=("config", "block", "opts"))
def _score(params, config, cache, logits0, targets, *, block, opts):
    """targets [B, N]: token t is predicted by logits of the previous one (logits0 for t=0)."""
    b, n = targets.shape
    feeds = targets[:, :-1]
    nb = max(1, -(-(n - 1) // block))
    feeds = jnp.pad(feeds, ((0, 0), (0, nb * block - (n - 1))))
    nexts = jnp.pad(targets[:, 1:], ((0, 0), (0, nb * block - (n - 1))))
    lp0 = jax.nn.log_softmax(logits0, axis=-1)
    nll0 = -jnp.take_along_axis(lp0, targets[:, :1], axis=-1)[:, 0]

    def body(carry, j):
        cache, total = carry
        f = jax.lax.dynamic_slice_in_dim(feeds, j * block, block, axis=1)
        y = jax.lax.dynamic_slice_in_dim(nexts, j * block, block, axis=1)
        pos = cache.lengths[:, None] + jnp.arange(block, dtype=jnp.int32)
        hidden, cache = forward(params, config, f, pos, cache, opts=opts)
        lp = jax.nn.log_softmax(lm_logits(params, hidden, opts), axis=-1)
        nll = -jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]  # [B, block]
        valid = jnp.minimum(block, (n - 1) - j * block)
        mask = jnp.arange(block) < valid
        cache = cache.commit(cache.lengths + valid)
        return (cache, total + jnp.sum(jnp.where(mask, nll, 0.0), axis=1)), None

    (cache, total), _ = jax.lax.scan(body, (cache, nll0), jnp.arange(nb))
    return total  # [B] summed NLL


def perplexity(params: Params, config: LlamaConfig, tokens, prefix_len: int, cache_spec: CacheSpec, block: int = 16,
               *, opts: ForwardOptions = DEFAULT_OPTIONS, prefilled: tuple | None = None) -> dict:
    """Perplexity of tokens[:, prefix_len:] given tokens[:, :prefix_len], reading `cache_spec`'s cache.

    tokens int32 [B, P + N] (N >= 1). The prefix is prefilled exactly; token P is scored from
    the prefill logits, the others teacher-forced in blocks of `block` (<= the cache's
    spec_room, and <= its group size for "int8").
    prefilled: (logits, cache) of the prefix with this cache_spec (to share a prefill).
    -> {"nll": mean NLL per token, "ppl": exp(nll), "tokens": B*N, "nll_per_row": [...]}.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, P + N], got shape {tokens.shape}")
    b, total = tokens.shape
    p = int(prefix_len)
    n = total - p
    if p < 1 or n < 1:
        raise ValueError(f"prefix_len={prefix_len} must leave at least one prefix and one scored token of {total}")
    if block < 1 or block > cache_spec.spec_room:
        raise ValueError(f"block={block} must be between 1 and the cache's spec_room={cache_spec.spec_room}")
    if cache_spec.kind == "int8" and block > cache_spec.group_size:
        raise ValueError(f"block={block} exceeds the KV group size {cache_spec.group_size}")
    nb = max(1, -(-(n - 1) // block))
    need = p + nb * block
    if need > cache_spec.capacity:
        raise ValueError(f"prefix {p} + {n} scored tokens (in blocks of {block}) needs a cache of {need} tokens, "
                         f"the spec has {cache_spec.capacity}")
    if need > config.max_position_embeddings:
        raise ValueError(f"{need} positions exceed max_position_embeddings={config.max_position_embeddings}")
    if prefilled is None:
        prefilled = prefill_cache(params, config, jnp.asarray(tokens[:, :p]), jnp.full((b,), p, jnp.int32),
                                  cache_spec=cache_spec, opts=opts)
    logits0, cache = prefilled
    nll = np.asarray(_score(params, config, cache, logits0, jnp.asarray(tokens[:, p:]), block=block, opts=opts),
                     np.float64)
    mean = float(nll.sum() / (b * n))
    return {"nll": mean, "ppl": math.exp(mean), "tokens": b * n, "nll_per_row": (nll / n).tolist()}
