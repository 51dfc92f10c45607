"""The errors a researcher meets, each with a message that says what to change.

`StaticArgumentError` (a TypeError): a traced value reached an argument that fixes array
  shapes or the loop structure (gamma, max_new_tokens, a CacheSpec field, eos_ids). Mark
  it static in your `jax.jit` (`static_argnames=...`) or close over it.
`CacheTooShortError` (a ValueError): the cache cannot hold prompt + requested tokens
  (+ gamma + 1 speculative slots); the message gives the capacity to use.
`DraftMismatchError` (a ValueError): a draft that was not made from this target (other
  shapes, or a stored draft whose target fingerprint differs); rebuild it with
  `make_draft` / `get_or_make_draft`, or delete the stale draft directory.
"""

from __future__ import annotations

import numpy as np

STATIC_ARGNAMES_HINT = ("config", "gamma", "max_new_tokens", "cache_spec", "method", "sampling", "eos_ids",
                        "opts")


class StaticArgumentError(TypeError):
    """A traced (or otherwise non-static) value where a Python value is needed at trace time."""


class CacheTooShortError(ValueError):
    """The KV cache is too short for the prompt plus the requested tokens."""


class DraftMismatchError(ValueError):
    """A draft that does not belong to this target (or to the requested recipe)."""


def is_traced(x) -> bool:
    """True for a JAX tracer (a value inside `jax.jit`, `vmap`, `grad`, ...)."""
    import jax

    return isinstance(x, jax.core.Tracer)


def _traced_message(name: str, value, where: str, what: str) -> str:
    return (f"{where}: {name} is a traced value ({getattr(value, 'aval', type(value).__name__)}), but it must be "
            f"{what} when the function is traced: it fixes array shapes and the decode loop. If you wrap "
            f"{where} in jax.jit, mark it static: jax.jit(fn, static_argnames=({name.split('[')[0]!r}, ...)) "
            f"(typically {', '.join(repr(n) for n in STATIC_ARGNAMES_HINT)}), or close over it with "
            f"functools.partial.")


def static_int(name: str, value, *, where: str) -> int:
    """`value` as a Python int, or an error naming `name` that says how to make it static.

    where: the function that needs it (for the message), e.g. "speculative_generate".
    Accepts Python ints, numpy integers and concrete 0-d integer arrays; rejects bools,
    floats and tracers (StaticArgumentError, a TypeError).
    """
    if is_traced(value):
        raise StaticArgumentError(_traced_message(name, value, where, "a Python int"))
    if isinstance(value, (bool, np.bool_)):
        raise StaticArgumentError(f"{where}: {name} must be a Python int (a static value), got a bool ({value})")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and np.shape(value) == () and \
            np.issubdtype(np.dtype(value.dtype), np.integer):
        return int(value)  # a concrete 0-d integer array
    raise StaticArgumentError(f"{where}: {name} must be a Python int (a static value), got "
                              f"{type(value).__name__} {value!r}")


def static_instance(name: str, value, cls: type, *, where: str):
    """`value` itself if it is a `cls` (a hashable static object such as CacheSpec or
    LlamaConfig); StaticArgumentError naming `name` if it was traced or is something else."""
    if is_traced(value):
        raise StaticArgumentError(_traced_message(name, value, where, f"a {cls.__name__}"))
    if not isinstance(value, cls):
        raise StaticArgumentError(f"{where}: {name} must be a {cls.__name__} (a static value), got "
                                  f"{type(value).__name__}")
    return value


def static_int_tuple(name: str, values, *, where: str) -> tuple[int, ...]:
    """A tuple of static ints (e.g. eos_ids), with the same messages as `static_int`."""
    if is_traced(values):
        static_int(name, values, where=where)  # raises the static-argument message
    try:
        items = tuple(values)
    except TypeError:
        raise StaticArgumentError(f"{where}: {name} must be a tuple of Python ints, got "
                                  f"{type(values).__name__} {values!r}") from None
    return tuple(static_int(f"{name}[{i}]", v, where=where) for i, v in enumerate(items))
