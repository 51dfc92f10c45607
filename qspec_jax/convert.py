"""Convert a checkpoint source into `(LlamaConfig, flat params, tokenizer)`.

A source is either

* a Hugging Face model directory: `config.json`, one or more `*.safetensors`
  (with or without `model.safetensors.index.json`) and tokenizer files, or
* a `.gguf` file of architecture `llama` or `qwen2` (llama.cpp's format), whose
  tensors are dequantized to float32 and whose tokenizer is rebuilt from its metadata.

The flat params dict is the contract with the model code. Every matrix is stored
`[in, out]` (Hugging Face's `[out, in]` transposed), everything as float32 numpy:

    embed                      [vocab, hidden]
    final_norm                 [hidden]
    lm_head                    [hidden, vocab]        only when not tie_word_embeddings
    layers.{i}.attn_norm       [hidden]
    layers.{i}.mlp_norm        [hidden]
    layers.{i}.wq              [hidden, n_heads*head_dim]
    layers.{i}.wk, .wv         [hidden, n_kv_heads*head_dim]
    layers.{i}.wo              [n_heads*head_dim, hidden]
    layers.{i}.bq              [n_heads*head_dim]     only when attention_bias
    layers.{i}.bk, .bv         [n_kv_heads*head_dim]  only when attention_bias
    layers.{i}.w_gate, .w_up   [hidden, intermediate]
    layers.{i}.w_down          [intermediate, hidden]

q/k rows are in Hugging Face order (rotate-half RoPE layout); llama.cpp's
interleaving permutation of llama GGUF files is undone here.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .config import ConfigError, LlamaConfig

__all__ = [
    "CheckpointError",
    "load_source",
    "load_hf_dir",
    "load_gguf",
    "param_shapes",
    "SUPPORTED_GGUF_TYPES",
    "SUPPORTED_GGUF_ARCHITECTURES",
]


class CheckpointError(ValueError):
    """A checkpoint source (or a saved checkpoint) that cannot be converted or loaded."""


# --------------------------------------------------------------------------------------
# The flat-params contract
# --------------------------------------------------------------------------------------

def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every flat param the model code expects for `config`
    (defined once, by the model: `model.expected_shapes`)."""
    from .model import expected_shapes

    return expected_shapes(config)


# Per-layer suffix: (HF name suffix, GGUF name suffix)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "mlp_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "bq": ("self_attn.q_proj.bias", "attn_q.bias"),
    "bk": ("self_attn.k_proj.bias", "attn_k.bias"),
    "bv": ("self_attn.v_proj.bias", "attn_v.bias"),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
}
_GLOBAL_NAMES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}
_TRANSPOSED = {"lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


def _source_names(config: LlamaConfig, which: int) -> dict[str, str]:
    """flat name -> source tensor name (which=0: HF, which=1: GGUF)."""
    out = {}
    for flat in param_shapes(config):
        if flat.startswith("layers."):
            _, i, key = flat.split(".", 2)
            prefix = f"model.layers.{i}." if which == 0 else f"blk.{i}."
            out[flat] = prefix + _LAYER_NAMES[key][which]
        else:
            out[flat] = _GLOBAL_NAMES[flat][which]
    return out


def _source_shape(flat: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF-layout ([out, in]) shape of a flat param of `shape`."""
    return tuple(reversed(shape)) if flat.split(".")[-1] in _TRANSPOSED else shape


def _progress(items: list, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True)


def _convert_tensors(
    config: LlamaConfig,
    names: dict[str, str],
    available: dict[str, tuple[tuple[int, ...], str]],
    load: Callable[[str], np.ndarray],
    where: Callable[[str], str],
    ignorable: Callable[[str], bool],
    transform: Callable[[str, np.ndarray], np.ndarray] | None,
    progress: bool,
    desc: str,
) -> dict[str, np.ndarray]:
    """Validate then load every tensor of `names` (flat -> source name).

    `available`: source name -> (source shape [out, in], dtype description), for validation
    before any data is read. `load(name)` returns float32 data in source layout.
    """
    shapes = param_shapes(config)
    wanted = set(names.values())
    missing = [names[f] for f in shapes if names[f] not in available]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{where(missing[0])}: missing tensor(s) {', '.join(missing[:5])}{more}"
        )
    unexpected = sorted(n for n in available if n not in wanted and not ignorable(n))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{where(unexpected[0])}: unexpected tensor(s) {', '.join(unexpected[:5])}{more} "
            f"for a {config.architecture} with {config.num_layers} layers"
        )
    for flat, shape in shapes.items():
        src = names[flat]
        want = _source_shape(flat, shape)
        got = available[src][0]
        if tuple(got) != want:
            raise CheckpointError(
                f"{where(src)}: tensor {src} has shape {list(got)}, expected {list(want)} from the config"
            )
    params: dict[str, np.ndarray] = {}
    for flat in _progress(list(shapes), desc, progress):
        src = names[flat]
        arr = load(src)
        if transform is not None:
            arr = transform(src, arr)
        if flat.split(".")[-1] in _TRANSPOSED:
            arr = arr.T
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.shape != shapes[flat]:  # cannot happen after the checks above, but cheap
            raise CheckpointError(f"{where(src)}: tensor {src} loaded with shape {arr.shape}")
        params[flat] = arr
    return params


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def load_source(src: str | os.PathLike, *, progress: bool = True, with_tokenizer: bool = True):
    """`(LlamaConfig, flat params, tokenizer)` from a HF model directory or a `.gguf` file.

    progress: show a tqdm bar (stderr) over the tensors.
    with_tokenizer=False: do not build the tokenizer (returned as None); for HF directories
    that carry no tokenizer files (e.g. tiny test models).
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"checkpoint source not found: {src}")
    if path.is_dir():
        return load_hf_dir(path, progress=progress, with_tokenizer=with_tokenizer)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return load_gguf(path, progress=progress, with_tokenizer=with_tokenizer)
    raise CheckpointError(
        f"{src}: not a Hugging Face model directory nor a .gguf file"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Hugging Face directory (safetensors)
# --------------------------------------------------------------------------------------

def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


class _SafetensorsFile:
    """Minimal reader of the safetensors format that also handles bfloat16 (via ml_dtypes)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.size = size
        self.entries: dict[str, dict] = header
        self._mm = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        dt = _safetensors_dtypes().get(e["dtype"])
        if dt is None:
            raise CheckpointError(
                f"{self.path}: tensor {name} has unsupported dtype {e['dtype']} "
                f"(supported: {', '.join(_safetensors_dtypes())})"
            )
        begin, end = e["data_offsets"]
        count = int(np.prod(e["shape"], dtype=np.int64))
        if end - begin != count * np.dtype(dt).itemsize or self.data_start + end > self.size:
            raise CheckpointError(f"{self.path}: tensor {name} has inconsistent data offsets")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.data_start + begin: self.data_start + end]
        return raw.view(dt).reshape(e["shape"])


_HF_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def load_hf_dir(path: str | os.PathLike, *, progress: bool = True, with_tokenizer: bool = True):
    """Convert a Hugging Face model directory."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"not a directory: {path}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e})") from None
    _merge_generation_eos(hf, d / "generation_config.json")
    try:
        config = LlamaConfig.from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None

    files = _find_safetensors(d)
    readers = {p: _SafetensorsFile(p) for p in files}
    location: dict[str, _SafetensorsFile] = {}
    for r in readers.values():
        for name in r.entries:
            if name in location:
                raise CheckpointError(
                    f"{r.path}: tensor {name} is also in {location[name].path}"
                )
            location[name] = r
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_index(index)
        for name, fname in weight_map.items():
            r = readers.get(d / fname)
            if r is None or name not in r.entries:
                raise CheckpointError(f"{index}: tensor {name} is not in {d / fname}")

    def where(name: str) -> str:
        r = location.get(name)
        return str(r.path) if r is not None else (str(files[0]) if len(files) == 1 else str(d))

    def ignorable(name: str) -> bool:
        return bool(_HF_IGNORABLE.search(name)) or (
            config.tie_word_embeddings and name == "lm_head.weight"
        )

    available = {n: (r.shape(n), r.dtype(n)) for n, r in location.items()}
    names = _source_names(config, 0)
    supported = _safetensors_dtypes()
    for src in names.values():
        if src in available and available[src][1] not in supported:
            raise CheckpointError(
                f"{where(src)}: tensor {src} has unsupported dtype {available[src][1]} "
                f"(supported: {', '.join(supported)})"
            )

    def load(name: str) -> np.ndarray:
        return location[name].get(name).astype(np.float32)

    params = _convert_tensors(config, names, available, load, where, ignorable, None,
                              progress, f"converting {d.name}")
    tokenizer = _load_hf_tokenizer(d) if with_tokenizer else None
    return config, params, tokenizer


def _as_list(v: Any) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _merge_generation_eos(hf: dict[str, Any], gen_path: Path) -> None:
    """Add generation_config.json's eos ids (e.g. Llama-3-Instruct's <|eot_id|>) to the config's."""
    if not gen_path.is_file():
        return
    try:
        with open(gen_path) as f:
            gen = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{gen_path}: cannot read ({e})") from None
    eos = _as_list(hf.get("eos_token_id"))
    for i in _as_list(gen.get("eos_token_id") if isinstance(gen, dict) else None):
        if i not in eos:
            eos.append(i)
    if eos:
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos


def _find_safetensors(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_index(index)
        files = sorted({d / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which does not exist in {d}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        other = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt*")]
        hint = f" (found {', '.join(sorted(other)[:3])}: only safetensors is supported)" if other else ""
        raise CheckpointError(f"{d}: no *.safetensors files{hint}")
    return files


def _read_index(index: Path) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
        return weight_map
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: cannot read weight_map ({e})") from None


def _load_hf_tokenizer(d: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((d / n).is_file() for n in names):
        raise CheckpointError(f"{d}: no tokenizer files (expected one of {', '.join(names)})")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - many failure types from transformers
        raise CheckpointError(f"{d}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{d}: the tokenizer is not a fast (tokenizers) tokenizer")
    return tok


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------

SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_GGUF_IGNORABLE = {"rope_freqs.weight"}


def _f32_round(x: float) -> float:
    """A float32 metadata value as the shortest decimal (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def load_gguf(path: str | os.PathLike, *, progress: bool = True, with_tokenizer: bool = True):
    """Convert a llama.cpp GGUF file (architecture llama or qwen2)."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, KeyError, struct errors...
        raise CheckpointError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    meta = _GgufMeta(reader, p)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{p}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    hf = _gguf_hf_config(meta, arch, tensors, p)
    try:
        config = LlamaConfig.from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None

    supported = {getattr(gguf.GGMLQuantizationType, n) for n in SUPPORTED_GGUF_TYPES}
    names = _source_names(config, 1)
    for src in names.values():
        t = tensors.get(src)
        if t is not None and t.tensor_type not in supported:
            raise CheckpointError(
                f"{p}: tensor {src} has unsupported GGUF type {t.tensor_type.name} "
                f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})"
            )
    available = {
        n: (tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type.name)
        for n, t in tensors.items()
    }

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(arr, dtype=np.float32).reshape(available[name][0])

    transform = None
    if arch == "llama":
        def transform(name: str, arr: np.ndarray) -> np.ndarray:
            if ".attn_q." in name:
                return _reverse_permute(arr, config.num_heads)
            if ".attn_k." in name:
                return _reverse_permute(arr, config.num_kv_heads)
            return arr

    params = _convert_tensors(
        config, names, available, load, lambda _n: str(p),
        lambda n: n in _GGUF_IGNORABLE, transform, progress, f"converting {p.name}",
    )
    tokenizer = _gguf_tokenizer(meta, arch, p) if with_tokenizer else None
    return config, params, tokenizer


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (weights [out, in] or biases [out]).

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    (same as transformers' `LlamaTensorProcessor._reverse_permute_weights`).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute a q/k tensor of {rows} rows into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (HF layout -> GGUF layout); the inverse of `_reverse_permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GgufMeta:
    def __init__(self, reader, path: Path):
        self.fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: cannot read metadata {key} ({e})") from None

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: missing GGUF metadata {key}")
        return self.get(key)


def _uniform(value: Any, key: str, path: Path) -> int:
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: per-layer {key} {value} is not supported")
        value = value[0]
    return int(value)


def _gguf_hf_config(meta: _GgufMeta, arch: str, tensors: dict, path: Path) -> dict[str, Any]:
    a = arch + "."
    n_heads = _uniform(meta.require(a + "attention.head_count"), "head_count", path)
    n_kv = _uniform(meta.get(a + "attention.head_count_kv", n_heads), "head_count_kv", path)
    hidden = int(meta.require(a + "embedding_length"))
    head_dim = int(meta.get(a + "attention.key_length", hidden // n_heads))
    v_len = int(meta.get(a + "attention.value_length", head_dim))
    if v_len != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length {v_len} is not supported")
    rot = meta.get(a + "rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embeddings (rope.dimension_count={rot}, head_dim={head_dim}) "
            "are not supported"
        )
    vocab = meta.get(a + "vocab_size")
    if vocab is None:
        tokens = meta.fields.get("tokenizer.ggml.tokens")
        if "token_embd.weight" in tensors:
            vocab = int(tensors["token_embd.weight"].shape[1])
        elif tokens is not None:
            vocab = len(tokens.data)
        else:
            raise CheckpointError(f"{path}: cannot tell the vocabulary size")
    ff = meta.require(a + "feed_forward_length")
    eps_default = 1e-6 if arch == "qwen2" else 1e-5
    hf: dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "num_hidden_layers": int(meta.require(a + "block_count")),
        "hidden_size": hidden,
        "intermediate_size": _uniform(ff, "feed_forward_length", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32_round(meta.get(a + "attention.layer_norm_rms_epsilon", eps_default)),
        "rope_theta": _f32_round(meta.get(a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(a + "context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(n.endswith("attn_q.bias") for n in tensors),
        "hidden_act": "silu",
    }
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        hf["bos_token_id"] = int(bos)
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    if eos:
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    scaling = _gguf_rope_scaling(meta, a, tensors, hf, path)
    if scaling is not None:
        hf["rope_scaling"] = scaling
    return hf


def _gguf_rope_scaling(meta: _GgufMeta, a: str, tensors: dict, hf: dict, path: Path) -> dict | None:
    kind = meta.get(a + "rope.scaling.type")
    factor = meta.get(a + "rope.scaling.factor")
    if kind is None and meta.get(a + "rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(a + "rope.scale_linear")
    if "rope_freqs.weight" in tensors:
        if kind not in (None, "none"):
            raise CheckpointError(f"{path}: rope_freqs.weight together with rope scaling {kind!r}")
        import gguf

        t = tensors["rope_freqs.weight"]
        freqs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        return _infer_llama3_scaling(freqs, hf["rope_theta"], hf["head_dim"], path)
    if kind in (None, "none"):
        return None
    if factor is None:
        raise CheckpointError(f"{path}: rope scaling {kind!r} without {a}rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32_round(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": _f32_round(factor)}
        orig = meta.get(a + "rope.scaling.original_context_length")
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = meta.get(a + "rope.scaling." + key)
            if v is not None:
                out[name] = _f32_round(v)
        for key in ("yarn_log_multiplier", "attn_factor", "yarn_attn_factor", "yarn_ext_factor"):
            if meta.get(a + "rope.scaling." + key) is not None:
                raise CheckpointError(f"{path}: rope.scaling.{key} is not supported")
        return out
    raise CheckpointError(f"{path}: unsupported rope scaling type {kind!r} (supported: linear, yarn)")


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The `rope_freqs.weight` tensor llama.cpp's converter writes for llama3 rope scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wl = original_max_position_embeddings / low_freq_factor
    high_wl = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, mid))


def _infer_llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int, path: Path) -> dict:
    """llama.cpp keeps only the per-frequency factors of llama3 scaling; find the parameters."""
    if freqs.shape != (head_dim // 2,):
        raise CheckpointError(f"{path}: rope_freqs.weight has {freqs.size} values, expected {head_dim // 2}")
    factor = float(np.round(freqs.max(), 4))
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 2.0, 8.0):
                if high <= low:
                    continue
                ref = llama3_rope_factors(theta, head_dim, factor, low, high, orig)
                if np.allclose(ref, freqs, rtol=1e-4, atol=1e-5):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise CheckpointError(
        f"{path}: rope_freqs.weight does not match llama3 rope scaling with common parameters"
    )


# ---- tokenizer from GGUF metadata (no torch) ----

# llama.cpp pre-tokenizers that split every digit on its own before the GPT-2 regex
# (StarCoder-family vocabularies, e.g. SmolLM). transformers' GGUF converter does not know them.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}

# tokenizer_config name -> GGUF metadata key (tokenizer.ggml.<key>) of the special token ids.
# Our own table: transformers keeps its copy private, and it is absent from some 5.x releases
# (5.17, the GPU machine's, failed to import it).
_GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                        "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _gguf_tokenizer(meta: _GgufMeta, arch: str, path: Path):
    """Rebuild the fast tokenizer from GGUF metadata, as transformers' `get_gguf_tokenizer` /
    `convert_gguf_tokenizer` do, but reading the metadata with the gguf package (transformers'
    own GGUF reader imports torch)."""
    import transformers
    from transformers import PreTrainedTokenizerFast
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:  # the module was reorganized between 5.x releases (5.17 lacks these)
        raise CheckpointError(
            f"{path}: building a tokenizer from GGUF metadata needs transformers >= 5.24 "
            f"(installed: {transformers.__version__}; {e}). Upgrade transformers, or convert a Hugging "
            f"Face directory instead (it carries tokenizer.json)") from None

    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
    grouped = {
        group: {name: meta.get(f"tokenizer.{key}") for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tok_dict["tokens"]
    tokenizer_type = tok_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        tok_config.setdefault("add_bos_token", True)
    for name, key in _GGUF_SPECIAL_TOKENS.items():
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and not 0 <= int(tid) < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key}={tid} is outside the vocabulary")
        tok_config[name] = tokens[int(tid)] if tid is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: cannot build the tokenizer (tokenizer.ggml.model={tokenizer_type!r}): {e}"
        ) from None
    if tok_dict.get("pre_tokenizer_type") in _DIGIT_SPLIT_PRE and tokenizer_type == "gpt2":
        from tokenizers import pre_tokenizers

        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    kwargs = {k: v for k, v in tok_config.items() if v is not None}
    kwargs.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
