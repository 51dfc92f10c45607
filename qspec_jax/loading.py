"""From a checkpoint on disk to arrays on device, and from text to prompt tokens."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from qspec_jax.checkpoint import load_checkpoint
from qspec_jax.config import LlamaConfig
from qspec_jax.model import Params, params_from_flat

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def load_model(checkpoint: str | os.PathLike | None = None, dtype: str = "bfloat16"):
    """Load a converted qspec-jax checkpoint: -> (config, params, tokenizer).

    checkpoint: a directory written by `convert_checkpoint` / scripts/convert_hf_checkpoint.py,
      or None for the embedded default model (SmolLM2-135M-Instruct, converted on first use
      into $QSPEC_CACHE or ~/.cache/qspec_jax).
    dtype: "bfloat16" (GPU) or "float32" (CPU: bf16 is emulated there).
    Returns (LlamaConfig, Params with arrays on the default device in `dtype` (matrices
    [in, out], embed [vocab, hidden]), a Hugging Face tokenizer).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if checkpoint is None:
        from qspec_jax.default_model import ensure_default_checkpoint

        checkpoint = ensure_default_checkpoint()
    config, flat, tokenizer = load_checkpoint(checkpoint)
    return config, params_from_flat(flat, config, DTYPES[dtype]), tokenizer


def encode_prompts(tokenizer, texts: list[str], *, chat: bool = False):
    """Texts (a list of B strings, or one string) -> (tokens int32 [B, T], lengths int32 [B]).

    tokens are right padded with 0 to T = the longest prompt; lengths are the true lengths.
    chat=True applies the tokenizer's chat template (one user turn, generation prompt);
    otherwise the tokenizer's special tokens (e.g. BOS) are added as it defines them.
    """
    if isinstance(texts, str):
        texts = [texts]
    rows = []
    for text in texts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("this tokenizer has no chat template (a base model?): pass chat=False "
                                 "(--chat on the command line)")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {text[:40]!r} encodes to no tokens")
        rows.append(list(ids))
    lengths = np.asarray([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return jnp.asarray(tokens), jnp.asarray(lengths)


def decode_row(tokenizer, tokens, length) -> str:
    """Text of one generated row: tokens int [N] (e.g. out.tokens[b]), length int (out.lengths[b]).

    Special tokens (EOS, chat markers) are skipped.
    """
    return tokenizer.decode(np.asarray(tokens)[: int(length)].tolist(), skip_special_tokens=True)


__all__ = ["DTYPES", "LlamaConfig", "Params", "decode_row", "encode_prompts", "load_model"]
