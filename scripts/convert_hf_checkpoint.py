#!/usr/bin/env python
"""Convert a Hugging Face model directory or a .gguf file into a qspec-jax checkpoint.

    python scripts/convert_hf_checkpoint.py SRC OUT [--dtype float32|bfloat16] [--overwrite]

SRC: a directory with config.json, *.safetensors and tokenizer files, or a llama/qwen2 .gguf.
OUT: the checkpoint directory to create (config.json, params/, tokenizer/).
Exit status 2 with a one-line message on an expected error (bad source, OUT exists, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    import qspec_jax  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Hugging Face model directory or .gguf file")
    ap.add_argument("out", help="output checkpoint directory")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="storage dtype of the params (default: float32)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)

    from qspec_jax.checkpoint import save_checkpoint
    from qspec_jax.config import ConfigError
    from qspec_jax.convert import CheckpointError, load_source

    t0 = time.time()
    try:
        if os.path.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"{args.out} already exists (use --overwrite to replace it)")
        config, params, tokenizer = load_source(args.src)
        out = save_checkpoint(args.out, config, params, tokenizer, dtype=args.dtype,
                              overwrite=args.overwrite, source=os.path.abspath(args.src))
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    n = sum(int(v.size) for v in params.values())
    print(f"wrote {out} ({config.architecture}, {config.num_layers} layers, "
          f"{n / 1e6:.1f}M params, {args.dtype}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
