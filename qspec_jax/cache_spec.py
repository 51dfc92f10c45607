"""`CacheSpec`: a hashable description of a KV cache, so jitted decoders can build it."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from qspec_jax.config import LlamaConfig

CACHE_KINDS = ("fp", "int8")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """kind "fp": full-precision KV; "int8": the hierarchical INT4/INT8 cache (target view).

    capacity: tokens per row (prompt + new tokens + speculative slack). For "int8" it is
      rounded up to a multiple of group_size.
    spec_room: tokens one forward may add past the committed length (gamma + 1).
    """

    capacity: int
    kind: str = "fp"
    dtype: str = "bfloat16"
    group_size: int = 128
    spec_room: int = 16

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {self.kind!r}")
        if self.capacity < 1:
            raise ValueError(f"cache capacity must be positive, got {self.capacity}")
        if self.kind == "int8":
            rounded = -(-self.capacity // self.group_size) * self.group_size
            object.__setattr__(self, "capacity", rounded)

    def init(self, config: LlamaConfig, batch: int):
        dtype = jnp.dtype(self.dtype)
        if self.kind == "fp":
            from qspec_jax.kv_cache import init_cache

            return init_cache(config, batch, self.capacity, dtype)
        from qspec_jax.hier_cache import init_hier_cache

        return init_hier_cache(config, batch, self.capacity, group_size=self.group_size,
                               spec_room=self.spec_room, dtype=dtype)
