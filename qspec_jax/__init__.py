"""qspec-jax: QuantSpec self-speculative decoding with a hierarchical quantized KV cache.

The public API, in the order a script uses it (arrays are jax arrays unless noted;
B = batch rows, T = padded prompt width, V = vocabulary):

Load a model
    load_model(checkpoint=None, dtype)   -> (LlamaConfig, Params, tokenizer); None = the
                                            embedded SmolLM2-135M-Instruct
    convert_checkpoint(src, out_dir)     Hugging Face directory / .gguf -> checkpoint
    encode_prompts(tok, texts, chat=)    -> tokens int32 [B, T] (right padded), lengths int32 [B]
    decode_row(tok, tokens[b], lengths[b]) -> str
    LlamaConfig                          the architecture (static under jit)

Make the draft (the target with INT4 weights)
    DraftRecipe(group_size, scope, quantize_lm_head, method)
    make_draft(params, recipe)           round-to-nearest INT4
    make_gptq_draft(params, config, calib_tokens int32 [N, T], recipe)
    get_or_make_draft(checkpoint_dir, params, config, recipe, calib_tokens=None)
                                         cached beside the checkpoint (save_draft / load_draft)
    weight_bytes_report(params, draft)   bytes read per decode step, target vs draft

Decode
    CacheSpec(capacity, kind "fp" | "int8", dtype, group_size, spec_room)   static
    generate(params, config, tokens, lengths, max_new_tokens=, cache_spec=)  -> GenerateOutput
    speculative_generate(params, draft, config, tokens, lengths, gamma=, max_new_tokens=,
                         cache_spec=, method=SpecMethod.quantspec())       -> SpecOutput
    SpecMethod.quantspec() / SpecMethod.streaming(window, sink)
    SpecStats.summary(gamma)             acceptance_rate, tokens_per_round, histogram
    SamplingParams, GREEDY, ForwardOptions(backend "auto" | "pallas" | "reference",
                   fixed_rows=R: GPU-exact speculation, same R for both decoders)
    prefill_cache, speculative_from_prefill   prefill once, decode many times
    init_fp_cache, init_hier_cache       the caches themselves (CacheSpec.init builds them;
                                         CacheSpec.nbytes(config, batch) sizes them)
    Params, LayerParams, KVCache, HierCache   the pytrees passed in and out

Evaluate
    acceptance_sweep(params, config, prompts int32 [B, P], drafts=, gammas=, mode="replay")
    perplexity(params, config, tokens int32 [B, P + N], P, cache_spec)
    load_documents, pg19_chunks, calibration_chunks, default_data_path   PG-19 data

Errors that say what to change: StaticArgumentError (mark an argument static under
jax.jit), CacheTooShortError (use a larger CacheSpec capacity), DraftMismatchError
(rebuild the draft from this target), ConfigError, CheckpointError, DataError.

`import qspec_jax` is cheap: each name is imported from its module on first use (so JAX
and the Pallas kernels load only when needed). See docs/api.md for a jitted research script.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # loading a model
    "load_model": "loading",
    "encode_prompts": "loading",
    "decode_row": "loading",
    "convert_checkpoint": "checkpoint",
    "LlamaConfig": "config",
    # the draft
    "DraftRecipe": "draft",
    "make_draft": "draft",
    "make_gptq_draft": "gptq",
    "get_or_make_draft": "draft_io",
    "save_draft": "draft_io",
    "load_draft": "draft_io",
    "weight_bytes_report": "draft_io",
    # decoding
    "CacheSpec": "cache_spec",
    "init_fp_cache": "cache_spec",
    "init_hier_cache": "hier_cache",
    "generate": "generate",
    "GenerateOutput": "generate",
    "prefill_cache": "generate",
    "speculative_generate": "speculative",
    "speculative_from_prefill": "speculative",
    "SpecMethod": "speculative",
    "SpecStats": "speculative",
    "SpecOutput": "speculative",
    "SamplingParams": "sampling",
    "GREEDY": "sampling",
    "ForwardOptions": "model",
    "Params": "model",
    "LayerParams": "model",
    "KVCache": "kv_cache",
    "HierCache": "hier_cache",
    # evaluation and data
    "acceptance_sweep": "evaluation",
    "perplexity": "evaluation",
    "load_documents": "data",
    "pg19_chunks": "data",
    "calibration_chunks": "data",
    "default_data_path": "data",
    "Document": "data",
    # errors
    "StaticArgumentError": "errors",
    "CacheTooShortError": "errors",
    "DraftMismatchError": "errors",
    "ConfigError": "config",
    "CheckpointError": "convert",
    "DataError": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qspec_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qspec_jax.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The import system binds every loaded submodule on its package (`qspec_jax.generate`
    = the module), which would shadow the public function of the same name. Bind the
    function instead; the module stays reachable as `sys.modules["qspec_jax.generate"]`
    and through `from qspec_jax.generate import ...`."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily
    from qspec_jax.cache_spec import CacheSpec, init_fp_cache
    from qspec_jax.checkpoint import convert_checkpoint
    from qspec_jax.config import ConfigError, LlamaConfig
    from qspec_jax.convert import CheckpointError
    from qspec_jax.data import (DataError, Document, calibration_chunks, default_data_path, load_documents,
                                pg19_chunks)
    from qspec_jax.draft import DraftRecipe, make_draft
    from qspec_jax.draft_io import get_or_make_draft, load_draft, save_draft, weight_bytes_report
    from qspec_jax.errors import CacheTooShortError, DraftMismatchError, StaticArgumentError
    from qspec_jax.evaluation import acceptance_sweep, perplexity
    from qspec_jax.generate import GenerateOutput, generate, prefill_cache
    from qspec_jax.gptq import make_gptq_draft
    from qspec_jax.hier_cache import init_hier_cache
    from qspec_jax.loading import decode_row, encode_prompts, load_model
    from qspec_jax.model import ForwardOptions
    from qspec_jax.sampling import GREEDY, SamplingParams
    from qspec_jax.speculative import SpecMethod, SpecOutput, SpecStats, speculative_from_prefill, speculative_generate
