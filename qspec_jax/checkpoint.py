"""qspec-jax checkpoints on disk.

Layout of a converted model checkpoint OUT:

    OUT/config.json   LlamaConfig.to_dict() plus "format": "qspec-jax-v1",
                      "params_dtype" and "source" (where it was converted from)
    OUT/params/       orbax checkpoint of the flat params dict (see convert.py for the names)
    OUT/tokenizer/    tokenizer.save_pretrained(...)

Generic array trees (e.g. quantized draft weights) use `save_pytree` / `load_pytree`:

    DIR/metadata.json {"format": "qspec-jax-pytree-v1", "metadata": {...}}
    DIR/arrays/       orbax checkpoint of the flat dict of arrays

Every save writes into a temporary sibling directory and renames it into place at the end,
so an interrupted or failed save never leaves anything at the destination that loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .config import LlamaConfig
from .convert import CheckpointError

__all__ = [
    "FORMAT",
    "PYTREE_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "convert_checkpoint",
    "load_config",
    "load_tokenizer",
    "load_params",
    "is_checkpoint",
    "save_pytree",
    "load_pytree",
]

FORMAT = "qspec-jax-v1"
PYTREE_FORMAT = "qspec-jax-pytree-v1"
_META_KEYS = ("format", "params_dtype", "source")
_DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------------------
# Atomic directory writes
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic_dir(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success rename it to `out`."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while saving; not overwriting it")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _check_flat(flat: Mapping[str, Any], what: str) -> None:
    if not isinstance(flat, Mapping) or not flat:
        raise ValueError(f"{what} must be a non-empty dict of arrays")
    for k, v in flat.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{what}: keys must be non-empty strings, got {k!r}")
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            raise ValueError(f"{what}: {k} is a {type(v).__name__}, not an array")


def _orbax_save(path: Path, flat: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp

    tree = {k: np.asarray(v) for k, v in flat.items()}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), tree)
        ckptr.wait_until_finished()


def _orbax_restore(path: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(path.absolute())
    return {k: np.asarray(v) for k, v in tree.items()}


def _np_dtype(dtype: Any):
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(dtype)
    except TypeError:
        # e.g. jnp.bfloat16
        return np.dtype(getattr(dtype, "dtype", dtype))


def _cast_floats(flat: Mapping[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    if dtype is None:
        return dict(flat)
    out = {}
    for k, v in flat.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16":
            v = v.astype(dtype, copy=False)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------
# Model checkpoints
# --------------------------------------------------------------------------------------

def save_checkpoint(
    out_dir: str | os.PathLike,
    config: LlamaConfig,
    flat_params: Mapping[str, Any],
    tokenizer,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    source: str | None = None,
) -> Path:
    """Save a converted model at `out_dir` (atomically). Returns the absolute path.

    dtype: "float32" or "bfloat16", the storage dtype of the floating-point params.
    Raises FileExistsError if `out_dir` exists and not `overwrite`.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    _check_flat(flat_params, "flat_params")
    from .convert import param_shapes

    expected = param_shapes(config)
    missing = sorted(set(expected) - set(flat_params))
    extra = sorted(set(flat_params) - set(expected))
    if missing or extra:
        raise CheckpointError(f"params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in expected.items():
        if tuple(flat_params[k].shape) != shape:
            raise CheckpointError(f"param {k} has shape {tuple(flat_params[k].shape)}, expected {shape}")

    params = _cast_floats(flat_params, _np_dtype(dtype))
    out = Path(out_dir).absolute()
    with _atomic_dir(out, overwrite) as tmp:
        _orbax_save(tmp / "params", params)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        cfg = config.to_dict()
        cfg["format"] = FORMAT
        cfg["params_dtype"] = dtype
        if source is not None:
            cfg["source"] = str(source)
        # config.json last: a directory without it is never taken for a checkpoint
        _write_json(tmp / "config.json", cfg)
    return out


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` holds a complete qspec-jax model checkpoint."""
    p = Path(path)
    try:
        with open(p / "config.json") as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return fmt == FORMAT and (p / "params").is_dir() and (p / "tokenizer").is_dir()


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.is_file():
        raise CheckpointError(f"{path}: not a qspec-jax checkpoint (no config.json)")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else None
        hint = " (a Hugging Face model directory? convert it with scripts/convert_hf_checkpoint.py)" if fmt is None else ""
        raise CheckpointError(f"{path}: not a qspec-jax checkpoint (format {fmt!r}, expected {FORMAT!r}){hint}")
    return d


def load_config(path: str | os.PathLike) -> LlamaConfig:
    d = _read_config_json(Path(path))
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    try:
        return LlamaConfig.from_dict({k: v for k, v in d.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: invalid config ({e})") from None


def load_tokenizer(path: str | os.PathLike):
    p = Path(path)
    _read_config_json(p)
    tdir = p / "tokenizer"
    if not tdir.is_dir():
        raise CheckpointError(f"{p}: checkpoint has no tokenizer/ directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tdir))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{tdir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def load_params(path: str | os.PathLike, *, dtype=None, config: LlamaConfig | None = None) -> dict[str, np.ndarray]:
    """The flat params dict (numpy arrays), optionally cast to `dtype` (floating arrays only)."""
    p = Path(path)
    if config is None:
        config = load_config(p)
    pdir = p / "params"
    if not pdir.is_dir():
        raise CheckpointError(f"{p}: checkpoint has no params/ directory")
    try:
        params = _orbax_restore(pdir)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{pdir}: cannot restore params ({type(e).__name__}: {e})") from None
    from .convert import param_shapes

    expected = param_shapes(config)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise CheckpointError(f"{pdir}: missing params {missing[:5]}")
    for k, shape in expected.items():
        if tuple(params[k].shape) != shape:
            raise CheckpointError(f"{pdir}: param {k} has shape {tuple(params[k].shape)}, expected {shape}")
    return _cast_floats(params, _np_dtype(dtype))


def load_checkpoint(path: str | os.PathLike, *, dtype=None):
    """`(config, flat_params, tokenizer)` of a qspec-jax checkpoint.

    flat_params are numpy arrays in the stored dtype, or cast to `dtype`
    ("float32", "bfloat16", np/jnp dtype) for the floating-point ones.
    """
    config = load_config(path)
    params = load_params(path, dtype=dtype, config=config)
    tokenizer = load_tokenizer(path)
    return config, params, tokenizer


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face model directory (config.json, *.safetensors, tokenizer files)
    or a llama/qwen2 `.gguf` file into a qspec-jax checkpoint at `out_dir`; returns its path.

    What `scripts/convert_hf_checkpoint.py SRC OUT` does. dtype: storage dtype of the
    params, "float32" or "bfloat16". Then `load_model(out_dir, dtype)` loads it.
    Raises CheckpointError / ConfigError (unsupported architecture, missing tensor, ...) and
    FileExistsError if out_dir exists and not overwrite.
    """
    from .convert import load_source

    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    config, flat, tokenizer = load_source(src, progress=progress)
    return save_checkpoint(out_dir, config, flat, tokenizer, dtype=dtype, overwrite=overwrite,
                           source=os.path.abspath(src))


# --------------------------------------------------------------------------------------
# Generic flat pytrees (draft weights, ...)
# --------------------------------------------------------------------------------------

def save_pytree(
    out_dir: str | os.PathLike,
    flat: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a flat dict of arrays (any dtype, e.g. uint8/float16/bfloat16) and a JSON-able
    metadata dict at `out_dir`, atomically. Returns the absolute path."""
    _check_flat(flat, "flat")
    meta = dict(metadata or {})
    try:
        meta_json = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serializable: {e}") from None
    out = Path(out_dir).absolute()
    with _atomic_dir(out, overwrite) as tmp:
        _orbax_save(tmp / "arrays", flat)
        _write_json(tmp / "metadata.json", {"format": PYTREE_FORMAT, "metadata": meta_json})
    return out


def load_pytree(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`(flat dict of numpy arrays, metadata)` saved by `save_pytree`."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"not found: {p}")
    mpath = p / "metadata.json"
    try:
        with open(mpath) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not a qspec-jax pytree directory ({e})") from None
    if not isinstance(d, dict) or d.get("format") != PYTREE_FORMAT:
        raise CheckpointError(f"{p}: not a qspec-jax pytree directory (format {d.get('format')!r})")
    try:
        arrays = _orbax_restore(p / "arrays")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{p / 'arrays'}: cannot restore ({type(e).__name__}: {e})") from None
    return arrays, d.get("metadata", {})
