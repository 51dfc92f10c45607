"""Draft weights on disk beside their target checkpoint, and weight-byte accounting.

Layout: `<checkpoint>/drafts/<tag>/` written by `checkpoint.save_pytree`, tag from
`recipe_tag` (e.g. `rtn-all-g128`, `gptq-mlp-g64`, `rtn-all-g128-fphead`). Only the
INT4 leaves are stored (`layers.<i>.<name>.{packed,scale,minimum}`, `lm_head.*`): every
other draft tensor IS the target's, re-attached on load. The metadata holds the recipe,
a fingerprint of the target (config + a checksum of a few tensors) and, for GPTQ, a
checksum of the calibration tokens. A draft saved for another model is refused on load
with `DraftMismatchError`.

On-disk format (`DRAFT_FORMAT`, in the metadata): v2 stores the K-major INT4 layout of
`qspec_jax.quant_weights` (packed uint8 [out, n_groups, G/2], scale / minimum float16
[out, n_groups]). `load_draft` refuses v1 drafts (the N-major layout, packed
[n_groups*G/2, out]) with a message to rebuild them (`OldDraftFormatError`);
`get_or_make_draft` rebuilds and overwrites them, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.checkpoint import CheckpointError, load_pytree, save_pytree
from qspec_jax.config import LlamaConfig
from qspec_jax.draft import ATTN_WEIGHTS, MLP_WEIGHTS, DraftRecipe, make_draft
from qspec_jax.errors import DraftMismatchError
from qspec_jax.model import Params
from qspec_jax.quant_weights import QuantizedWeight

DRAFT_FORMAT = "qspec-jax-draft-v2"  # bump whenever the stored arrays' layout changes
_OLD_FORMATS = {"qspec-jax-draft-v1": "the N-major INT4 layout, packed [n_groups*G/2, out], used before the "
                                      "switch to the K-major [out, n_groups, G/2] layout"}


class OldDraftFormatError(DraftMismatchError):
    """A stored draft of an older on-disk format (`_OLD_FORMATS`; `.format`): rebuild it."""

    def __init__(self, message: str, format: str):
        super().__init__(message)
        self.format = format


_TAG_RE = re.compile(r"^(rtn|gptq)-(all|mlp)-g(\d+)(-fphead)?$")


# ----------------------------------------------------------------------------- recipes as tags


def recipe_tag(recipe: DraftRecipe) -> str:
    return f"{recipe.method}-{recipe.scope}-g{recipe.group_size}" + ("" if recipe.quantize_lm_head else "-fphead")


def parse_recipe(tag: str) -> DraftRecipe:
    """`rtn-all-g128`, `gptq-mlp-g64`, `rtn-all-g128-fphead` (lm_head kept full precision)."""
    m = _TAG_RE.match(tag.strip().lower())
    if not m:
        raise ValueError(f"bad draft recipe {tag!r}: expected METHOD-SCOPE-gN[-fphead] with METHOD rtn|gptq, "
                         f"SCOPE all|mlp, N the weight group size (e.g. rtn-all-g128, gptq-mlp-g64)")
    return DraftRecipe(group_size=int(m.group(3)), scope=m.group(2), quantize_lm_head=m.group(4) is None,
                       method=m.group(1))


def draft_dir(checkpoint_dir: str | os.PathLike, recipe: DraftRecipe) -> Path:
    return Path(checkpoint_dir) / "drafts" / recipe_tag(recipe)


# ----------------------------------------------------------------------------- fingerprints


def _bf16_bytes(x) -> bytes:
    a = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    return np.ascontiguousarray(a).view(np.uint16).tobytes()


def target_fingerprint(params: Params, config: LlamaConfig) -> str:
    """Config + a checksum of a few tensors (taken in bfloat16, so a float32 and a
    bfloat16 load of one checkpoint agree)."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    first, last = params.layers[0], params.layers[-1]
    for w in (first.wqkv, last.w_down):
        if isinstance(w, QuantizedWeight):
            raise ValueError("target params hold INT4 weights: pass the full-precision target, not a draft")
    stride = max(1, params.embed.shape[0] // 257)
    for name, arr in (("embed", params.embed[::stride]), ("layers.0.wqkv", first.wqkv),
                      (f"layers.{len(params.layers) - 1}.w_down", last.w_down), ("final_norm", params.final_norm)):
        h.update(f"{name}:{tuple(arr.shape)}".encode())
        h.update(_bf16_bytes(arr))
    return h.hexdigest()[:32]


def tokens_fingerprint(tokens) -> str:
    a = np.ascontiguousarray(np.asarray(tokens, np.int32))
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- save / load


def _quantized_leaves(draft: Params) -> dict[str, QuantizedWeight]:
    out = {}
    for i, layer in enumerate(draft.layers):
        for f in ATTN_WEIGHTS + MLP_WEIGHTS:
            w = getattr(layer, f)
            if isinstance(w, QuantizedWeight):
                out[f"layers.{i}.{f}"] = w
    if isinstance(draft.lm_head, QuantizedWeight):
        out["lm_head"] = draft.lm_head
    return out


def _expected_names(config: LlamaConfig, recipe: DraftRecipe) -> set[str]:
    names = {f"layers.{i}.{f}" for i in range(config.num_layers) for f in recipe.weight_names()}
    if recipe.quantize_lm_head:
        names.add("lm_head")
    return names


def save_draft(checkpoint_dir: str | os.PathLike, draft_params: Params, recipe: DraftRecipe, *,
               target_params: Params | None = None, config: LlamaConfig | None = None,
               fingerprint: str | None = None, calibration: dict | None = None, overwrite: bool = True) -> Path:
    """Save the INT4 leaves of `draft_params` at `<checkpoint_dir>/drafts/<tag>/`.

    The target fingerprint comes from `fingerprint`, or is computed from target_params and
    config (one of the two is required: a draft without it could not be checked on load).
    calibration: JSON-able description of GPTQ's calibration (e.g. {"tokens": sha, "shape": [..]}).
    """
    if fingerprint is None:
        if target_params is None or config is None:
            raise ValueError("save_draft needs target_params and config (or fingerprint=) to fingerprint the target")
        fingerprint = target_fingerprint(target_params, config)
    leaves = _quantized_leaves(draft_params)
    if not leaves:
        raise ValueError("draft_params hold no INT4 weights: nothing to save (is this the target?)")
    if config is not None and set(leaves) != _expected_names(config, recipe):
        raise ValueError(f"draft does not match recipe {recipe_tag(recipe)}: it quantizes {len(leaves)} weights, "
                         f"the recipe {len(_expected_names(config, recipe))}")
    flat = {}
    shapes = {}
    for name, qw in leaves.items():
        if qw.group_size != recipe.group_size:
            raise ValueError(f"{name} has group size {qw.group_size}, recipe {recipe.group_size}")
        flat[f"{name}.packed"] = np.asarray(qw.packed)
        flat[f"{name}.scale"] = np.asarray(qw.scale)
        flat[f"{name}.minimum"] = np.asarray(qw.minimum)
        shapes[name] = [int(d) for d in qw.shape]  # [in, out]
    meta = {"format": DRAFT_FORMAT, "recipe": dataclasses.asdict(recipe), "tag": recipe_tag(recipe),
            "target_fingerprint": fingerprint, "shapes": shapes, "calibration": calibration}
    return save_pytree(draft_dir(checkpoint_dir, recipe), flat, meta, overwrite=overwrite)


def load_draft(checkpoint_dir: str | os.PathLike, target_params: Params, config: LlamaConfig,
               recipe: DraftRecipe, *, calibration: dict | None = None) -> Params | None:
    """The stored draft for `recipe`, re-attached to `target_params`; None if none is stored
    (or, when `calibration` is given, if the stored one was calibrated on other tokens).

    Raises DraftMismatchError if the stored draft was made from another model or recipe.
    """
    path = draft_dir(checkpoint_dir, recipe)
    if not (path / "metadata.json").is_file():
        return None
    flat, meta = load_pytree(path)
    fmt = meta.get("format")
    if fmt in _OLD_FORMATS:
        raise OldDraftFormatError(
            f"{path}: draft saved in the old on-disk format {fmt!r} ({_OLD_FORMATS[fmt]}); this version reads "
            f"{DRAFT_FORMAT!r}. Delete {path} and rebuild the draft (get_or_make_draft rebuilds and saves it; or "
            f"make_draft(target_params, recipe) / gptq.make_gptq_draft)", fmt)
    if fmt != DRAFT_FORMAT:
        raise DraftMismatchError(f"{path}: not a qspec-jax draft of format {DRAFT_FORMAT!r} (format {fmt!r})")
    stored = meta.get("recipe", {})
    if stored != dataclasses.asdict(recipe):
        raise DraftMismatchError(f"{path}: stored recipe {stored} differs from the requested "
                                 f"{dataclasses.asdict(recipe)}: delete {path} (get_or_make_draft then rebuilds "
                                 f"it) or request the stored recipe")
    fp = target_fingerprint(target_params, config)
    if meta.get("target_fingerprint") != fp:
        raise DraftMismatchError(
            f"{path}: this draft was made from another model (target fingerprint {meta.get('target_fingerprint')}, "
            f"this target {fp}). Delete the stale draft directory {path} and rebuild it "
            f"(get_or_make_draft rebuilds and saves it; or make_draft(target_params, recipe)), or load the target "
            f"checkpoint it was made from")
    if calibration is not None and meta.get("calibration") != calibration:
        return None
    shapes = meta.get("shapes", {})
    expected = _expected_names(config, recipe)
    if set(shapes) != expected:
        raise DraftMismatchError(f"{path}: stores {len(shapes)} INT4 weights, recipe {recipe_tag(recipe)} "
                                 f"needs {len(expected)}: delete {path} and rebuild the draft")
    qws = {}
    for name, (k, n) in shapes.items():
        try:
            packed, scale, mn = (flat[f"{name}.{p}"] for p in ("packed", "scale", "minimum"))
        except KeyError as e:
            raise CheckpointError(f"{path}: missing array {e}") from None
        g, k, n = recipe.group_size, int(k), int(n)
        ng = -(-k // g)
        if packed.shape != (n, ng, g // 2) or scale.shape != (n, ng) or mn.shape != (n, ng):
            raise DraftMismatchError(
                f"{path}: {name} stores packed {packed.shape}, scale {scale.shape}, minimum {mn.shape}; the "
                f"{DRAFT_FORMAT} layout of a [{k}, {n}] weight at G={g} is packed {(n, ng, g // 2)}, scale/minimum "
                f"{(n, ng)}: delete {path} and rebuild the draft")
        qws[name] = QuantizedWeight(packed=jnp.asarray(packed), scale=jnp.asarray(scale), minimum=jnp.asarray(mn),
                                    in_features=int(k), group_size=recipe.group_size)

    def lookup(name, i, w):
        qw = qws[name if i < 0 else f"layers.{i}.{name}"]
        if tuple(qw.shape) != tuple(w.shape):
            raise DraftMismatchError(f"{path}: {name} (layer {i}) has shape {qw.shape}, the target {tuple(w.shape)}: "
                                     f"a draft of another model; delete {path} and rebuild the draft")
        return qw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_draft(target_params, recipe, quantizer=lookup)


def get_or_make_draft(checkpoint_dir: str | os.PathLike | None, target_params: Params, config: LlamaConfig,
                      recipe: DraftRecipe, calib_tokens=None, *, save: bool = True, progress=None,
                      **gptq_kwargs) -> Params:
    """Load the stored draft for `recipe`, else quantize (RTN, or GPTQ on calib_tokens) and
    save it (unless save=False or checkpoint_dir is None).

    For GPTQ a stored draft is reused only if it was calibrated on the same tokens (when
    calib_tokens are given); with calib_tokens=None any stored GPTQ draft is used. A stored
    draft of an older on-disk format is rebuilt and overwritten (with a warning; GPTQ needs
    calib_tokens for that, else OldDraftFormatError).
    """
    calibration = None
    if recipe.method == "gptq" and calib_tokens is not None:
        calibration = {"tokens": tokens_fingerprint(calib_tokens), "shape": list(np.shape(calib_tokens))}
    if checkpoint_dir is not None:
        try:
            draft = load_draft(checkpoint_dir, target_params, config, recipe, calibration=calibration)
        except OldDraftFormatError as e:
            if recipe.method == "gptq" and calib_tokens is None:
                raise
            warnings.warn(f"{draft_dir(checkpoint_dir, recipe)}: stored draft in the old on-disk format "
                          f"{e.format!r}: rebuilding it as {DRAFT_FORMAT!r}", stacklevel=2)
            draft = None
        if draft is not None:
            return draft
    if recipe.method == "gptq":
        if calib_tokens is None:
            raise ValueError(f"no stored draft {recipe_tag(recipe)} and no calibration tokens for GPTQ")
        from qspec_jax.gptq import make_gptq_draft

        draft = make_gptq_draft(target_params, config, calib_tokens, recipe, progress=progress, **gptq_kwargs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            draft = make_draft(target_params, recipe)
    if checkpoint_dir is not None and save:
        try:
            save_draft(checkpoint_dir, draft, recipe, target_params=target_params, config=config,
                       calibration=calibration)
        except OSError as e:  # a read-only checkpoint still evaluates
            warnings.warn(f"could not save the draft beside {checkpoint_dir}: {e}", stacklevel=2)
    return draft


# ----------------------------------------------------------------------------- bytes


def _nbytes(x, dense_itemsize: int | None) -> int:
    if isinstance(x, QuantizedWeight):
        return x.nbytes
    if x is None:
        return 0
    item = x.dtype.itemsize if dense_itemsize is None else dense_itemsize
    return int(np.prod(x.shape)) * item


def _read_bytes(p: Params, dense_itemsize: int | None) -> int:
    total = _nbytes(p.final_norm, dense_itemsize)
    for layer in p.layers:
        for f in ("attn_norm", "mlp_norm", "bqkv") + ATTN_WEIGHTS + MLP_WEIGHTS:
            total += _nbytes(getattr(layer, f), dense_itemsize)
    # the head: a separate (maybe INT4) lm_head, else the tied embedding read whole as embed^T
    total += _nbytes(p.lm_head if p.lm_head is not None else p.embed, dense_itemsize)
    return total


def weight_bytes_report(target: Params, draft: Params | None = None, *, dense_itemsize: int | None = None) -> dict:
    """Bytes of the target's and the draft's weights.

    *_read_per_step: weight bytes one decode step streams (every layer weight and norm, the
      head: INT4 packed codes + fp16 scale/min where quantized, dense bytes where the draft
      shares the target's tensor). The embedding lookup reads one row per token and is not
      counted; a tied head reads the whole embedding matrix and is.
    target_stored: every target tensor. draft_extra_stored: what the draft adds on disk /
      in memory beside the target (its INT4 tensors; everything else is shared).
    dense_itemsize: count dense tensors at this many bytes per value (2 = fp16/bf16, the
      deployment dtype) instead of their in-memory dtype (float32 on CPU).
    """
    rep = {"target_stored": sum(_nbytes(x, dense_itemsize) for x in jax.tree_util.tree_leaves(
               target, is_leaf=lambda x: isinstance(x, QuantizedWeight))),
           "target_read_per_step": _read_bytes(target, dense_itemsize)}
    if draft is not None:
        extra = _quantized_leaves(draft)
        rep["draft_read_per_step"] = _read_bytes(draft, dense_itemsize)
        rep["draft_extra_stored"] = sum(q.nbytes for q in extra.values())
        rep["draft_read_ratio"] = rep["draft_read_per_step"] / rep["target_read_per_step"]
    return rep


def draft_bytes(target: Params, draft: Params, *, dense_itemsize: int | None = None) -> dict:
    """Alias of `weight_bytes_report(target, draft, ...)`."""
    return weight_bytes_report(target, draft, dense_itemsize=dense_itemsize)
