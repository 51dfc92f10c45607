"""`CacheSpec`: a hashable description of a KV cache, so jitted decoders can build it.

A `CacheSpec` is a static argument of every decoder (`generate`, `speculative_generate`):
the decoder builds the cache inside its jitted function with `spec.init(config, batch)`.
`spec.nbytes(config, batch)` gives the memory the cache takes without allocating it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qspec_jax.config import LlamaConfig
from qspec_jax.errors import StaticArgumentError, static_int

CACHE_KINDS = ("fp", "int8")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Which KV cache a decoder builds, and how long it is (frozen: a static jit argument).

    capacity: int, tokens per row (prompt + max_new_tokens, + gamma + 1 speculative slots
      for `speculative_generate`). For "int8" it is rounded up to a multiple of group_size.
    kind: "fp" full-precision K/V ([B, KV heads, capacity, head_dim] per layer, in `dtype`);
      "int8" the hierarchical QuantSpec cache (INT4 upper + lower planes of an INT8 code,
      fp16 scales, and a full-precision buffer of 2*group_size + spec_room recent tokens).
    dtype: "bfloat16", "float16" or "float32": the full-precision K/V (kind "fp") or buffer.
    group_size: tokens per KV quantization group ("int8" only; even, >= gamma + 1).
    spec_room: tokens one forward may add past the committed length: >= gamma + 1.

    Example: `CacheSpec(capacity=1024, kind="int8", dtype="float32", group_size=128, spec_room=5)`.
    """

    capacity: int
    kind: str = "fp"
    dtype: str = "bfloat16"
    group_size: int = 128
    spec_room: int = 16

    def __post_init__(self):
        for name in ("capacity", "group_size", "spec_room"):
            object.__setattr__(self, name, static_int(name, getattr(self, name), where="CacheSpec"))
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {self.kind!r}")
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError:
            raise StaticArgumentError(f"CacheSpec: dtype must be a dtype name such as 'bfloat16' or "
                                      f"'float32', got {self.dtype!r}") from None
        object.__setattr__(self, "dtype", dt.name)  # jnp.float32 -> "float32": one hashable spelling
        if self.capacity < 1:
            raise ValueError(f"cache capacity must be positive, got {self.capacity}")
        if self.spec_room < 1:
            raise ValueError(f"spec_room must be >= 1 (gamma + 1 for speculative decoding), got {self.spec_room}")
        if self.kind == "int8":
            if self.group_size < 2 or self.group_size % 2:
                raise ValueError(f"KV group size must be even and >= 2, got {self.group_size}")
            if self.spec_room > self.group_size:
                raise ValueError(f"spec_room={self.spec_room} must not exceed the KV group size {self.group_size} "
                                 f"of an 'int8' cache: use spec_room <= {self.group_size} (gamma <= "
                                 f"{self.group_size - 1}) or a larger group_size")
            rounded = -(-self.capacity // self.group_size) * self.group_size
            object.__setattr__(self, "capacity", rounded)

    def init(self, config: LlamaConfig, batch: int):
        """An empty cache for `batch` rows: a `KVCache` (kind "fp") or a `HierCache` ("int8").

        Both carry `lengths` int32 [B] (committed tokens, zero here) and an `nbytes` property.
        """
        dtype = jnp.dtype(self.dtype)
        if self.kind == "fp":
            from qspec_jax.kv_cache import init_cache

            return init_cache(config, batch, self.capacity, dtype)
        from qspec_jax.hier_cache import init_hier_cache

        return init_hier_cache(config, batch, self.capacity, group_size=self.group_size,
                               spec_room=self.spec_room, dtype=dtype)

    def nbytes(self, config: LlamaConfig, batch: int = 1) -> int:
        """Bytes of the cache's K/V storage for `batch` rows, computed without allocating it
        (`jax.eval_shape`): K and V for "fp"; planes, scales/minima and buffer for "int8"."""
        return int(jax.eval_shape(lambda: self.init(config, batch)).nbytes)


def init_fp_cache(config: LlamaConfig, batch: int, capacity: int, dtype="bfloat16"):
    """An empty full-precision KV cache (`kv_cache.KVCache`).

    Per layer K and V of shape [batch, config.num_kv_heads, capacity, config.head_dim] in
    `dtype`; `lengths` int32 [batch] = 0. Same as `CacheSpec(capacity, "fp", dtype).init(config, batch)`.
    """
    from qspec_jax.kv_cache import init_cache

    return init_cache(config, batch, static_int("capacity", capacity, where="init_fp_cache"), jnp.dtype(dtype))
