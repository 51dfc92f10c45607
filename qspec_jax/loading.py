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
    """-> (config, params on device in `dtype`, tokenizer). None: the embedded SmolLM2."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if checkpoint is None:
        from qspec_jax.default_model import ensure_default_checkpoint

        checkpoint = ensure_default_checkpoint()
    config, flat, tokenizer = load_checkpoint(checkpoint)
    return config, params_from_flat(flat, config, DTYPES[dtype]), tokenizer


def encode_prompts(tokenizer, texts: list[str], *, chat: bool = False):
    """Texts -> right-padded int32 tokens [B, T] and lengths [B].

    chat=True applies the tokenizer's chat template (one user turn, generation prompt).
    """
    if isinstance(texts, str):
        texts = [texts]
    rows = []
    for text in texts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("this tokenizer has no chat template; drop --chat / chat=True")
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
    return tokenizer.decode(np.asarray(tokens)[: int(length)].tolist(), skip_special_tokens=True)


__all__ = ["DTYPES", "LlamaConfig", "Params", "decode_row", "encode_prompts", "load_model"]
