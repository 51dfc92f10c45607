"""Self-speculative decoding in one `jax.lax.while_loop`: draft, verify, accept, commit.

One round for each batch row with L committed tokens and `last` (sampled, not yet in
the cache, at position L):
  draft   gamma one-token steps of the draft (INT4 weights + 4-bit view of the cache,
          or a StreamingLLM window) write their K/V at positions L..L+gamma-1;
  verify  one target pass over [last, d_1..d_gamma] at positions L..L+gamma overwrites
          those slots with target K/V and gives gamma+1 target distributions;
  accept  greedy: the longest prefix where the target's argmax equals the draft, plus
          the target's own next token; sampling: accept d_i with min(1, p/q), on
          rejection sample from normalize(max(p - q, 0)), after all gamma the bonus from p;
  commit  L += accepted + 1. Rejected slots are simply beyond the new length (rollback);
          the hierarchical cache quantizes a completed group and shifts its buffer
          (flush) inside `commit`, under lax.cond.
Everything runs on device; the host sees only the final tokens and statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.cache_spec import CacheSpec
from qspec_jax.config import LlamaConfig
from qspec_jax.draft import ATTN_WEIGHTS, MLP_WEIGHTS
from qspec_jax.errors import DraftMismatchError, is_traced, static_instance, static_int, static_int_tuple
from qspec_jax.generate import (RUNNING, STOP_EOS, STOP_LENGTH, check_fits, check_fixed_rows, emit,
                                is_eos, prefill)
from qspec_jax.hier_cache import DRAFT, TARGET
from qspec_jax.kv_cache import StreamingView
from qspec_jax.model import DEFAULT_OPTIONS, ForwardOptions, Params, forward, lm_logits
from qspec_jax.sampling import GREEDY, SamplingParams, probabilities, sample


@dataclasses.dataclass(frozen=True)
class SpecMethod:
    """How the draft reads the cache, and which cache is used.

    quantspec():  hierarchical INT4/INT8 cache; draft reads the upper plane, target both.
                  Use with an INT4 draft (`make_draft`) and CacheSpec(kind="int8").
    streaming(window, sink=4):  full-precision cache; draft reads `sink` attention sinks +
                  the last `window` tokens (MagicDec-style StreamingLLM self-speculation),
                  target reads it all. Use with draft_params = target_params and
                  CacheSpec(kind="fp").
    Frozen and hashable: a static argument under `jax.jit`.
    """

    name: str
    draft_view: object
    target_view: object
    cache_kind: str

    @staticmethod
    def quantspec() -> "SpecMethod":
        return SpecMethod("quantspec", DRAFT, TARGET, "int8")

    @staticmethod
    def streaming(window: int, sink: int = 4) -> "SpecMethod":
        window = static_int("window", window, where="SpecMethod.streaming")
        sink = static_int("sink", sink, where="SpecMethod.streaming")
        if window < 1 or sink < 0:
            raise ValueError(f"StreamingLLM needs window >= 1 and sink >= 0, got window={window}, sink={sink}")
        return SpecMethod("streaming", StreamingView(sink=sink, window=window), None, "fp")


@flax.struct.dataclass
class SpecStats:
    """Acceptance statistics of one `speculative_generate` call (device arrays; a pytree).

    `summary(gamma)` -> dict with acceptance_rate (accepted drafts / (gamma * rounds)),
    tokens_per_round ((accepted + rounds) / rounds: tokens per target pass), rounds,
    accepted, flushes and accepted_per_round_hist (rounds by number of accepted drafts).
    """

    rounds: jax.Array  # int32 [B] rounds each row took part in
    accepted: jax.Array  # int32 [B] draft tokens accepted
    flushes: jax.Array  # int32 [B] groups quantized during decoding
    accept_hist: jax.Array  # int32 [gamma + 1] rounds by number of accepted drafts

    def summary(self, gamma: int) -> dict:
        """Totals over the batch as plain Python numbers (one host transfer)."""
        rounds = int(np.sum(self.rounds))
        acc = int(np.sum(self.accepted))
        return {
            "gamma": gamma,
            "rounds": rounds,
            "accepted": acc,
            "acceptance_rate": acc / max(1, gamma * rounds),
            "tokens_per_round": (acc + rounds) / max(1, rounds),
            "flushes": int(np.sum(self.flushes)),
            "accepted_per_round_hist": [int(x) for x in np.asarray(self.accept_hist)],
        }


@flax.struct.dataclass
class SpecOutput:
    """What `speculative_generate` returns: like `GenerateOutput`, plus `stats` (SpecStats)."""

    tokens: jax.Array  # int32 [B, max_new_tokens]
    lengths: jax.Array  # int32 [B]
    stop_reason: jax.Array  # int32 [B]
    stats: SpecStats


@flax.struct.dataclass
class SpecState:
    out: jax.Array  # int32 [B, max_new + gamma + 1]
    n_out: jax.Array  # int32 [B]
    done: jax.Array  # bool [B]
    stop_reason: jax.Array  # int32 [B]
    last: jax.Array  # int32 [B] newest token, not yet in the cache
    cache: object
    rng: jax.Array
    stats: SpecStats


def validate_gamma(gamma: int, cache_spec: CacheSpec, *, where: str = "speculative_generate") -> int:
    """gamma as a Python int, checked against the cache; errors say what to change."""
    static_instance("cache_spec", cache_spec, CacheSpec, where=where)
    gamma = static_int("gamma", gamma, where=where)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if cache_spec.kind == "int8" and gamma + 1 > cache_spec.group_size:
        raise ValueError(f"gamma={gamma}: gamma + 1 must not exceed the KV group size {cache_spec.group_size}: "
                         f"use gamma <= {cache_spec.group_size - 1} or CacheSpec(group_size="
                         f"{-(-(gamma + 1) // 2) * 2} or larger, spec_room={gamma + 1})")
    if cache_spec.spec_room < gamma + 1:
        raise ValueError(f"gamma={gamma} needs cache spec_room >= gamma + 1 = {gamma + 1}, "
                         f"the cache has spec_room={cache_spec.spec_room}: use "
                         f"dataclasses.replace(cache_spec, spec_room={gamma + 1}) or a smaller gamma")
    return gamma


def accept_greedy(draft_tokens, target_logits):
    """draft [B, g], target logits [B, g+1, V] -> (n_accepted [B], next token [B])."""
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    match = draft_tokens == target[:, :-1]
    n = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
    return n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]


def accept_sampling(key, draft_tokens, draft_probs, target_logits, sp: SamplingParams):
    """Speculative sampling (Leviathan et al.): output ~ the target's distribution.

    draft_tokens [B, g], draft_probs [B, g, V], target_logits [B, g+1, V].
    """
    b, g = draft_tokens.shape
    p = probabilities(target_logits, sp)  # [B, g+1, V]
    k_u, k_res = jax.random.split(key)
    pd = jnp.take_along_axis(p[:, :g], draft_tokens[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, (b, g))
    ok = u * qd < pd  # u < p/q without dividing by q
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
    q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]  # zero after g accepts
    resid = jnp.maximum(p_n - q_n, 0.0)
    mass = resid.sum(-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_n)
    # log of a masked distribution: never log(0) (under jit on CPU, log(max(x, 1e-38))
    # flushed the subnormal constant to zero and argmax met NaN)
    logits = jnp.where(resid > 0, jnp.log(jnp.where(resid > 0, resid, 1.0)), -jnp.inf)
    nxt = jax.random.categorical(k_res, logits)
    return n, nxt.astype(jnp.int32)


_STATIC = ("config", "gamma", "max_new_tokens", "method", "cache_spec", "sampling", "eos_ids", "opts",
           "on_tokens")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _speculative(target_params, draft_params, tokens, lengths, rng, *, config, gamma, max_new_tokens,
                 method, cache_spec, sampling, eos_ids, opts, on_tokens=None):
    cache = cache_spec.init(config, tokens.shape[0])
    logits, cache = prefill(target_params, config, tokens, lengths, cache, opts)
    return _spec_loop(target_params, draft_params, cache, logits, rng, config=config, gamma=gamma,
                      max_new_tokens=max_new_tokens, method=method, cache_spec=cache_spec, sampling=sampling,
                      eos_ids=eos_ids, opts=opts, on_tokens=on_tokens)


def _spec_loop(target_params, draft_params, cache, logits, rng, *, config, gamma, max_new_tokens, method,
               cache_spec, sampling, eos_ids, opts, on_tokens=None):
    """The decode loop from a prefilled cache and the prompt's last-position logits [B, V]."""
    b = logits.shape[0]
    rng, key = jax.random.split(rng)
    first = sample(key, logits, sampling)
    emit(on_tokens, first[:, None], jnp.ones((b,), jnp.int32))
    eos = is_eos(first, eos_ids)
    done = eos | (max_new_tokens == 1)
    width = max_new_tokens + gamma + 1
    zeros_b = jnp.zeros((b,), jnp.int32)
    state = SpecState(
        out=jnp.zeros((b, width), jnp.int32).at[:, 0].set(first), n_out=jnp.ones((b,), jnp.int32),
        done=done, stop_reason=jnp.where(eos, STOP_EOS, jnp.where(done, STOP_LENGTH, RUNNING)),
        last=first, cache=cache, rng=rng,
        stats=SpecStats(rounds=zeros_b, accepted=zeros_b, flushes=zeros_b,
                        accept_hist=jnp.zeros((gamma + 1,), jnp.int32)))
    group = cache_spec.group_size

    def draft_step(carry, i):
        cache, tok, key = carry
        pos = cache.lengths + i
        hidden, cache = forward(draft_params, config, tok[:, None], pos[:, None], cache,
                                view=method.draft_view, opts=opts.for_draft())
        logits = lm_logits(draft_params, hidden[:, 0], opts)
        key, sk = jax.random.split(key)
        nxt = sample(sk, logits, sampling)
        q = None if sampling.greedy else probabilities(logits, sampling)
        return (cache, nxt, key), (nxt, q)

    def body(s: SpecState):
        rng, k_draft, k_acc = jax.random.split(s.rng, 3)
        base = s.cache.lengths
        (cache, _, _), (drafts, q) = jax.lax.scan(draft_step, (s.cache, s.last, k_draft), jnp.arange(gamma))
        drafts = drafts.T  # [B, gamma]
        feed = jnp.concatenate([s.last[:, None], drafts], axis=1)
        pos = base[:, None] + jnp.arange(gamma + 1, dtype=jnp.int32)
        hidden, cache = forward(target_params, config, feed, pos, cache, view=method.target_view, opts=opts)
        logits = lm_logits(target_params, hidden, opts)  # [B, gamma+1, V]
        if sampling.greedy:
            n_acc, nxt = accept_greedy(drafts, logits)
        else:
            n_acc, nxt = accept_sampling(k_acc, drafts, jnp.moveaxis(q, 0, 1), logits, sampling)
        # emitted tokens: d_1..d_n then nxt; cut at the first EOS and at max_new_tokens
        cand = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        cand = cand.at[jnp.arange(b), n_acc].set(nxt)
        idx = jnp.arange(gamma + 1)
        eos_at = jnp.where(is_eos(cand, eos_ids) & (idx[None] <= n_acc[:, None]), idx[None], gamma + 1)
        first_eos = jnp.min(eos_at, axis=1)
        count = jnp.minimum(n_acc + 1, first_eos + 1)
        count = jnp.minimum(count, max_new_tokens - s.n_out)
        live = ~s.done
        count = jnp.where(live, count, 0)
        emit(on_tokens, cand, count)
        write = idx[None] < count[:, None]
        cols = s.n_out[:, None] + idx[None]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], cols.shape)
        out = s.out.at[rows, cols].set(jnp.where(write, cand, s.out[rows, jnp.minimum(cols, width - 1)]),
                                       mode="drop")
        n_out = s.n_out + count
        new_len = base + count
        cache = cache.commit(new_len)
        hit_eos = live & (first_eos < count)
        full = live & (n_out >= max_new_tokens)
        reason = jnp.where(hit_eos, STOP_EOS, jnp.where(full, STOP_LENGTH, s.stop_reason))
        last = jnp.where(live, jnp.take_along_axis(cand, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0],
                         s.last)
        li = live.astype(jnp.int32)
        flushed = ((new_len // group) > (base // group)).astype(jnp.int32) if cache_spec.kind == "int8" else 0
        st = s.stats
        stats = SpecStats(rounds=st.rounds + li, accepted=st.accepted + li * n_acc,
                          flushes=st.flushes + li * flushed,
                          accept_hist=st.accept_hist + jnp.sum(jax.nn.one_hot(n_acc, gamma + 1, dtype=jnp.int32)
                                                               * li[:, None], axis=0))
        return SpecState(out=out, n_out=n_out, done=s.done | hit_eos | full, stop_reason=reason, last=last,
                         cache=cache, rng=rng, stats=stats)

    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
    return SpecOutput(tokens=s.out[:, :max_new_tokens], lengths=s.n_out, stop_reason=s.stop_reason, stats=s.stats)


def speculative_generate(target_params: Params, draft_params: Params, config: LlamaConfig, tokens, lengths, *,
                         gamma: int, max_new_tokens: int, cache_spec: CacheSpec,
                         method: SpecMethod | None = None, sampling: SamplingParams = GREEDY, rng=None,
                         eos_ids: tuple[int, ...] | None = None,
                         opts: ForwardOptions = DEFAULT_OPTIONS, on_tokens=None) -> SpecOutput:
    """Self-speculative decoding (QuantSpec by default) of right-padded prompts, all jitted.

    target_params: the full-precision `Params`; draft_params: the same model with INT4
      weights (`make_draft` / `get_or_make_draft`) for QuantSpec, or target_params itself
      for `SpecMethod.streaming(...)`.
    config: the target's `LlamaConfig` (static).
    tokens: int32 [B, T] prompts, right padded; lengths: int32 [B] true lengths (1..T).
    gamma: static int >= 1, draft tokens per round.
    max_new_tokens: static int, tokens to generate per row (EOS included).
    cache_spec: static `CacheSpec`: kind "int8" for QuantSpec, "fp" for StreamingLLM; its
      spec_room must be >= gamma + 1 and its capacity >= max(lengths) + max_new_tokens +
      gamma + 1 (and >= T).
    method: static `SpecMethod` (default `SpecMethod.quantspec()`).
    sampling: static `SamplingParams` (default greedy); rng: PRNG key (default key 0).
    eos_ids: static tuple of stop tokens (default config.eos_token_ids); () never stops.
    opts: static `ForwardOptions`.
    on_tokens(tokens int32 [B, k], counts int32 [B]): optional host callback for streaming.
    Returns `SpecOutput`: tokens int32 [B, max_new_tokens], lengths int32 [B], stop_reason
      int32 [B], stats `SpecStats` (`out.stats.summary(gamma)` for the acceptance rate).
    Greedy sampling reproduces greedy decoding of the target over the same cache.

    Inside your own `jax.jit`: mark config, gamma, max_new_tokens, cache_spec, method,
    sampling, eos_ids and opts static (see docs/api.md); params, tokens, lengths and rng
    may be traced. A traced gamma or max_new_tokens raises StaticArgumentError, a cache
    too short CacheTooShortError, a draft of other shapes DraftMismatchError.
    """
    where = "speculative_generate"
    method = SpecMethod.quantspec() if method is None else method
    static_instance("method", method, SpecMethod, where=where)
    static_instance("config", config, LlamaConfig, where=where)
    gamma = validate_gamma(gamma, cache_spec, where=where)
    max_new_tokens = static_int("max_new_tokens", max_new_tokens, where=where)
    if method.cache_kind != cache_spec.kind:
        raise ValueError(f"method {method.name!r} needs a cache of kind {method.cache_kind!r}, "
                         f"got cache_spec.kind={cache_spec.kind!r}: use "
                         f"dataclasses.replace(cache_spec, kind={method.cache_kind!r})")
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be int32 [B, T] and lengths int32 [B], got shapes {tokens.shape} and "
                         f"{lengths.shape} (a single prompt: tokens[None], lengths[None])")
    extra, what = check_fixed_rows(opts, cache_spec, gamma + 1)
    check_fits(lengths, max_new_tokens, cache_spec.capacity, config, extra=extra, padded_width=tokens.shape[1],
               extra_what=what)
    if isinstance(method.draft_view, StreamingView):
        v = method.draft_view
        if cache_spec.capacity < v.sink + v.window + gamma:
            raise ValueError(f"StreamingLLM window {v.window} + sink {v.sink} + gamma {gamma} = "
                             f"{v.sink + v.window + gamma} does not fit the cache length {cache_spec.capacity}: "
                             f"use a smaller window or CacheSpec(capacity >= {v.sink + v.window + gamma})")
    _check_draft_matches(target_params, draft_params, config)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = tuple(config.eos_token_ids) if eos_ids is None else static_int_tuple("eos_ids", eos_ids, where=where)
    return _speculative(target_params, draft_params, tokens, lengths, rng, config=config, gamma=gamma,
                        max_new_tokens=max_new_tokens, method=method, cache_spec=cache_spec,
                        sampling=sampling, eos_ids=eos, opts=opts, on_tokens=on_tokens)


speculative_from_prefill = jax.jit(_spec_loop, static_argnames=_STATIC)
speculative_from_prefill.__doc__ = """The speculative decode loop alone, from a prefilled cache (jitted).

    speculative_from_prefill(target_params, draft_params, cache, logits, rng, *, config,
                             gamma, max_new_tokens, method, cache_spec, sampling, eos_ids, opts)

`logits, cache = prefill_cache(..., cache_spec=cache_spec)` gives cache and logits
(float32 [B, V] at each row's last prompt position); rng: a PRNG key; the keyword arguments are
static, as in `speculative_generate`. Returns `SpecOutput` (tokens int32 [B, max_new_tokens],
lengths int32 [B], stats). Lets an evaluation prefill
once and sweep gamma or drafts. No validation here: call `validate_gamma` and
`check_fits` first (speculative_generate does)."""


_REBUILD = ("rebuild the draft from this target: make_draft(target_params, DraftRecipe(...)), or "
            "get_or_make_draft(checkpoint_dir, target_params, config, recipe), which refuses a stored draft of "
            "another model (DraftMismatchError; delete <checkpoint>/drafts/<recipe> to rebuild it)")


def _check_draft_matches(target: Params, draft: Params, config: LlamaConfig) -> None:
    """A draft from another model fails here, with a message, not deep inside tracing.

    Shapes must match (DraftMismatchError). A draft of the same shapes whose full-precision
    tensors (the norms, which `make_draft` shares with the target) differ is another model
    of the same architecture: decoding stays lossless but acceptance collapses, so it is a
    warning, not an error (checked only when the params are concrete, not traced).
    """
    if len(draft.layers) != len(target.layers) or len(target.layers) != config.num_layers:
        raise DraftMismatchError(f"draft has {len(draft.layers)} layers, target {len(target.layers)}, config "
                                 f"{config.num_layers}: the draft must be made from this target; {_REBUILD}")
    if draft.embed.shape != target.embed.shape:
        raise DraftMismatchError(f"draft embedding {draft.embed.shape} != target {target.embed.shape}: "
                                 f"the draft must be made from this target; {_REBUILD}")
    tl, dl = target.layers[0], draft.layers[0]
    for f in ATTN_WEIGHTS + MLP_WEIGHTS:
        if tuple(getattr(dl, f).shape) != tuple(getattr(tl, f).shape):
            raise DraftMismatchError(f"draft layer weight {f} has shape {tuple(getattr(dl, f).shape)}, target "
                                     f"{tuple(getattr(tl, f).shape)}: the draft must be made from this target; "
                                     f"{_REBUILD}")
    pairs = [(draft.final_norm, target.final_norm), (dl.attn_norm, tl.attn_norm),
             (draft.layers[-1].mlp_norm, target.layers[-1].mlp_norm)]
    if any(a is b for a, b in pairs) or any(is_traced(a) or is_traced(b) for a, b in pairs):
        return
    same = all(np.array_equal(np.asarray(jnp.asarray(a).astype(jnp.bfloat16)),
                              np.asarray(jnp.asarray(b).astype(jnp.bfloat16))) for a, b in pairs)
    if not same:
        warnings.warn("draft_params hold other norm weights than target_params: a draft from another model? "
                      "Decoding stays exact but acceptance will be poor; " + _REBUILD, stacklevel=3)
