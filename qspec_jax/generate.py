"""Autoregressive decoding: prefill, then one token per step inside `lax.while_loop`.

This is the baseline every speedup is measured against, and (with the hierarchical
INT8 cache) the exact reference greedy speculative decoding must reproduce.
"""

from __future__ import annotations

import functools
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.cache_spec import CacheSpec
from qspec_jax.config import LlamaConfig
from qspec_jax.errors import CacheTooShortError, is_traced, static_instance, static_int, static_int_tuple
from qspec_jax.model import DEFAULT_OPTIONS, ForwardOptions, Params, forward, gather_rows, lm_logits
from qspec_jax.sampling import GREEDY, SamplingParams, sample

# stop reasons
RUNNING, STOP_EOS, STOP_LENGTH = 0, 1, 2


@flax.struct.dataclass
class GenerateOutput:
    """What `generate` returns (a pytree: fine to return from your own jitted function)."""

    tokens: jax.Array  # int32 [B, max_new_tokens]; entries past lengths[b] are padding
    lengths: jax.Array  # int32 [B] generated tokens per row (EOS included)
    stop_reason: jax.Array  # int32 [B]: STOP_EOS or STOP_LENGTH


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # int32 scalar
    out: jax.Array  # int32 [B, max_new]
    n_out: jax.Array  # int32 [B]
    done: jax.Array  # bool [B]
    stop_reason: jax.Array  # int32 [B]
    last: jax.Array  # int32 [B], the token to feed next
    cache: object
    rng: jax.Array


SPEC_SLOTS = "speculative slots (gamma + 1)"
PADDED_SLOTS = "padded slots (ForwardOptions.fixed_rows)"


def check_fits(prompt_lengths, max_new_tokens: int, capacity: int, config: LlamaConfig, extra: int = 0, *,
               padded_width: int | None = None, extra_what: str = SPEC_SLOTS):
    """Raise before compiling if a prompt plus its new tokens cannot fit.

    prompt_lengths: int [B] true prompt lengths (numpy or a concrete jax array). Inside a
      jitted caller they are tracers and their values are unknown: then the static padded
      prompt width `padded_width` (tokens.shape[1]) is used as the bound instead.
    extra: slots one forward writes past the last generated token (gamma + 1 speculative
      tokens, or ForwardOptions.fixed_rows when set).
    Raises CacheTooShortError (a ValueError) with the numbers and the capacity to use.
    """
    max_new_tokens = static_int("max_new_tokens", max_new_tokens, where="check_fits")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if is_traced(prompt_lengths):
        if padded_width is None:
            return  # nothing known to check before tracing
        longest, what = int(padded_width), f"padded prompt width {int(padded_width)} (lengths are traced)"
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.size == 0:
            raise ValueError("no prompts: lengths is empty")
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        longest, what = int(lengths.max()), f"prompt of {int(lengths.max())} tokens"
    if padded_width is not None and padded_width > capacity:
        raise CacheTooShortError(
            f"the padded prompt width {padded_width} exceeds the cache length {capacity} (the prefill writes the "
            f"whole padded prompt): use CacheSpec(capacity={padded_width + max_new_tokens + extra}, ...) or larger")
    need = longest + max_new_tokens + extra
    if need > capacity:
        room = capacity - longest - extra
        hint = f", or max_new_tokens <= {room}" if room >= 1 else ", or a shorter prompt"
        raise CacheTooShortError(
            f"{what} + max_new_tokens={max_new_tokens}"
            + (f" + {extra} {extra_what}" if extra else "")
            + f" = {need} exceeds the cache length {capacity}: use CacheSpec(capacity={need}, ...) or larger"
            + hint)
    if need > config.max_position_embeddings:
        raise ValueError(
            f"prompt + new tokens = {need} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}: lower max_new_tokens or shorten the prompt")


def check_fixed_rows(opts: ForwardOptions, cache_spec: CacheSpec, spec_slots: int = 0) -> tuple[int, str]:
    """Validate ForwardOptions.fixed_rows against the cache; -> (slots one forward writes past
    the last token, what they are) for `check_fits`: spec_slots (gamma + 1 speculative tokens,
    0 for autoregressive decoding), or fixed_rows when set.

    A padded forward writes fixed_rows K/V slots past the committed length, so an "int8"
    cache needs spec_room >= fixed_rows; and the speculative tokens must fit the padding.
    """
    rows = opts.fixed_rows
    if not rows:
        return spec_slots, SPEC_SLOTS
    if rows < spec_slots:
        raise ValueError(f"ForwardOptions(fixed_rows={rows}) is smaller than the {spec_slots} tokens one "
                         f"forward takes (gamma + 1): use fixed_rows >= {spec_slots}")
    if cache_spec.kind == "int8" and cache_spec.spec_room < rows:
        raise ValueError(f"ForwardOptions(fixed_rows={rows}) writes {rows} buffer slots per forward, the cache has "
                         f"spec_room={cache_spec.spec_room}: use dataclasses.replace(cache_spec, spec_room={rows})")
    return rows, PADDED_SLOTS if rows > spec_slots else SPEC_SLOTS


def prefill(params: Params, config: LlamaConfig, tokens, lengths, cache, opts: ForwardOptions):
    """Exact attention over right-padded prompts [B, T]; -> (last-position logits [B, V], cache)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = cache.with_prompt_lengths(lengths)
    hidden, cache = forward(params, config, tokens, positions, cache, prefill=True, opts=opts)
    logits = lm_logits(params, gather_rows(hidden, lengths - 1), opts)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("config", "cache_spec", "opts"))
def prefill_cache(params: Params, config: LlamaConfig, tokens, lengths, *, cache_spec: CacheSpec,
                  opts: ForwardOptions = DEFAULT_OPTIONS):
    """Prefill a new cache (built from the static `cache_spec`) with right-padded prompts.

    tokens int32 [B, T], lengths int32 [B]. Returns (float32 logits [B, V] at each row's
    last prompt position, the filled cache with lengths = `lengths`). Lets an evaluation
    prefill once and run several decoders from the same cache (`speculative_from_prefill`).
    """
    cache = cache_spec.init(config, tokens.shape[0])
    return prefill(params, config, tokens, lengths, cache, opts)


def is_eos(tokens, eos_ids: tuple[int, ...]):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def emit(on_tokens, tokens, counts):
    """Hand new tokens [B, k] (counts [B] of them valid) to a host callback, if any.

    Used only for streaming text to a terminal; benchmarks pass none, so the loop never
    waits on the host.
    """
    if on_tokens is not None:
        jax.debug.callback(on_tokens, tokens, counts, ordered=True)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "cache_spec",
                                             "eos_ids", "opts", "on_tokens"))
def _generate(params, tokens, lengths, rng, *, config, max_new_tokens, sampling, cache_spec, eos_ids,
              opts, on_tokens=None):
    b = tokens.shape[0]
    cache = cache_spec.init(config, b)
    logits, cache = prefill(params, config, tokens, lengths, cache, opts)
    rng, key = jax.random.split(rng)
    first = sample(key, logits, sampling)
    emit(on_tokens, first[:, None], jnp.ones((b,), jnp.int32))
    eos = is_eos(first, eos_ids)
    done = eos | (max_new_tokens == 1)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    state = DecodeState(step=jnp.int32(1), out=out, n_out=jnp.ones((b,), jnp.int32), done=done,
                        stop_reason=jnp.where(eos, STOP_EOS, jnp.where(done, STOP_LENGTH, RUNNING)),
                        last=first, cache=cache, rng=rng)

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState):
        pos = s.cache.lengths  # the fed token's position
        hidden, cache = forward(params, config, s.last[:, None], pos[:, None], s.cache, opts=opts)
        logits = lm_logits(params, hidden, opts)[:, 0]  # [B, 1, H]: fixed_rows pads it like a verify pass
        rng, key = jax.random.split(s.rng)
        tok = sample(key, logits, sampling)
        live = ~s.done
        emit(on_tokens, tok[:, None], live.astype(jnp.int32))
        cache = cache.commit(s.cache.lengths + live.astype(jnp.int32))
        out = s.out.at[jnp.arange(b), s.n_out].set(jnp.where(live, tok, s.out[jnp.arange(b), s.n_out]),
                                                   mode="drop")
        n_out = s.n_out + live
        eos = live & is_eos(tok, eos_ids)
        full = live & (n_out >= max_new_tokens)
        reason = jnp.where(eos, STOP_EOS, jnp.where(full, STOP_LENGTH, s.stop_reason))
        return DecodeState(step=s.step + 1, out=out, n_out=n_out, done=s.done | eos | full,
                           stop_reason=reason, last=jnp.where(live, tok, s.last), cache=cache, rng=rng)

    s = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens=s.out, lengths=s.n_out, stop_reason=s.stop_reason)


def generate(params: Params, config: LlamaConfig, tokens, lengths, *, max_new_tokens: int,
             cache_spec: CacheSpec, sampling: SamplingParams = GREEDY, rng=None,
             eos_ids: tuple[int, ...] | None = None, opts: ForwardOptions = DEFAULT_OPTIONS,
             on_tokens=None) -> GenerateOutput:
    """Autoregressive decoding (the baseline): prefill, then one token per step, all jitted.

    params: the target's `Params` (float32 or bfloat16 arrays); config: its `LlamaConfig`.
    tokens: int32 [B, T] prompts, right padded; lengths: int32 [B] true lengths (1..T).
    max_new_tokens: static int, tokens to generate per row (EOS included).
    cache_spec: static `CacheSpec`: "fp" (full precision) or "int8" (hierarchical); its
      capacity must hold max(lengths) + max_new_tokens (and T).
    sampling: static `SamplingParams` (default greedy); rng: a PRNG key (default key 0).
    eos_ids: static tuple of stop tokens (default: config.eos_token_ids); () never stops early.
    opts: static `ForwardOptions` (backend "auto": Pallas kernels on GPU, jnp elsewhere).
    on_tokens(tokens int32 [B, k], counts int32 [B]): optional host callback for streaming
      (costs a host round trip per step; leave None when timing).
    Returns `GenerateOutput`: tokens int32 [B, max_new_tokens] (entries past lengths[b] are
      padding), lengths int32 [B], stop_reason int32 [B] (STOP_EOS = 1, STOP_LENGTH = 2).

    Can be called inside your own `jax.jit` if config, max_new_tokens, cache_spec,
    sampling, eos_ids and opts are static there (static_argnames); the cache-length check
    then uses the padded width T in place of the traced lengths.
    """
    static_instance("config", config, LlamaConfig, where="generate")
    static_instance("cache_spec", cache_spec, CacheSpec, where="generate")
    max_new_tokens = static_int("max_new_tokens", max_new_tokens, where="generate")
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be int32 [B, T] and lengths int32 [B], got shapes {tokens.shape} and "
                         f"{lengths.shape} (a single prompt: tokens[None], lengths[None])")
    extra, what = check_fixed_rows(opts, cache_spec)
    check_fits(lengths, max_new_tokens, cache_spec.capacity, config, extra=extra, padded_width=tokens.shape[1],
               extra_what=what)
    if not is_traced(lengths) and np.asarray(lengths).max() > tokens.shape[1]:
        raise ValueError(f"a prompt length ({int(np.asarray(lengths).max())}) exceeds the padded prompt width "
                         f"{tokens.shape[1]}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = tuple(config.eos_token_ids) if eos_ids is None else static_int_tuple("eos_ids", eos_ids, where="generate")
    return _generate(params, tokens, lengths, rng, config=config, max_new_tokens=max_new_tokens,
                     sampling=sampling, cache_spec=cache_spec, eos_ids=eos, opts=opts, on_tokens=on_tokens)
