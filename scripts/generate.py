#!/usr/bin/env python
"""Generate text with the target alone or with QuantSpec self-speculative decoding.

  python scripts/generate.py --prompt "Tell me about owls" --chat
  python scripts/generate.py --prompt-file doc.txt --speculative --gamma 4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--checkpoint", default=None, help="converted checkpoint dir (default: embedded SmolLM2)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU (where bfloat16 is emulated and slower)")
    p.add_argument("--cache", choices=["fp", "int8"], default="fp",
                   help="autoregressive KV cache: full precision or the hierarchical INT8 cache")
    p.add_argument("--speculative", action="store_true", help="QuantSpec self-speculative decoding")
    p.add_argument("--method", choices=["quantspec", "streaming"], default="quantspec",
                   help="draft for --speculative: INT4 weights + 4-bit KV (quantspec) or StreamingLLM window")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round")
    p.add_argument("--kv-group", type=int, default=128, help="KV quantization group size G")
    p.add_argument("--weight-group", type=int, default=128, help="draft INT4 weight group size")
    p.add_argument("--draft-scope", choices=["all", "mlp"], default="all")
    p.add_argument("--draft-method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--streaming-window", type=int, default=0, help="StreamingLLM window (0: 1/4 of the prompt)")
    p.add_argument("--backend", choices=["auto", "pallas", "reference"], default="auto")
    p.add_argument("--fixed-rows", type=int, default=0,
                   help="GPU-exact mode (ForwardOptions.fixed_rows, >= gamma + 1): greedy output of --speculative "
                        "and of autoregressive decoding with the same value agree bit for bit on the GPU")
    p.add_argument("--json", action="store_true", help='print one JSON line {"tokens", "text", "stats"}')
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from qspec_jax.cache_spec import CacheSpec
    from qspec_jax.generate import generate
    from qspec_jax.loading import decode_row, encode_prompts, load_model
    from qspec_jax.model import ForwardOptions
    from qspec_jax.sampling import SamplingParams

    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            print(f"error: prompt file not found: {args.prompt_file}", file=sys.stderr)
            return 2
        with open(args.prompt_file) as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    if args.dtype == "auto":
        args.dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
        config, params, tok = load_model(args.checkpoint, args.dtype)
        tokens, lengths = encode_prompts(tok, [prompt], chat=args.chat)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        opts = ForwardOptions(backend=args.backend, fixed_rows=args.fixed_rows)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt_len = int(lengths[0])
    room = max(args.gamma + 1 if args.speculative else 1, args.fixed_rows)
    need = prompt_len + args.max_new_tokens + room
    stream = None if (args.json or args.no_stream) else TextStreamer(tok)
    rng = jax.random.PRNGKey(args.seed)
    t0 = time.perf_counter()
    try:
        if args.speculative:
            out, stats = run_speculative(args, config, params, tokens, lengths, need, sampling, rng, opts, stream)
        else:
            spec = CacheSpec(capacity=need, kind=args.cache, dtype=args.dtype, group_size=args.kv_group,
                             spec_room=room)
            out = generate(params, config, tokens, lengths, max_new_tokens=args.max_new_tokens, cache_spec=spec,
                           sampling=sampling, rng=rng, opts=opts, on_tokens=stream)
            stats = {"method": "autoregressive", "cache": args.cache}
        jax.block_until_ready(out.tokens)
    except (ValueError, TypeError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    n = int(out.lengths[0])
    stats.update(prompt_tokens=prompt_len, new_tokens=n, seconds_including_compile=round(seconds, 3),
                 stop_reason=["running", "eos", "length"][int(out.stop_reason[0])])
    text = decode_row(tok, out.tokens[0], n)
    if args.json:
        print(json.dumps({"tokens": [int(t) for t in out.tokens[0, :n]], "text": text, "stats": stats}))
    else:
        if stream is None:
            print(text)
        else:
            print()
        print(f"[{json.dumps(stats)}]", file=sys.stderr)
    return 0


def run_speculative(args, config, params, tokens, lengths, need, sampling, rng, opts, stream):
    from qspec_jax.cache_spec import CacheSpec
    from qspec_jax.draft import DraftRecipe
    from qspec_jax.quant_weights import weight_bytes
    from qspec_jax.speculative import SpecMethod, speculative_generate

    if args.method == "quantspec":
        recipe = DraftRecipe(group_size=args.weight_group, scope=args.draft_scope, method=args.draft_method)
        draft = load_or_make_draft(args, config, params, recipe)
        method = SpecMethod.quantspec()
        kind = "int8"
        extra = {"draft_recipe": recipe.__dict__, "kv_group": args.kv_group,
                 "target_weight_bytes": weight_bytes(params), "draft_weight_bytes": weight_bytes(draft)}
    else:
        window = args.streaming_window or max(16, int(lengths[0]) // 4)
        draft, method, kind = params, SpecMethod.streaming(window=window), "fp"
        extra = {"streaming_window": window}
    spec = CacheSpec(capacity=need, kind=kind, dtype=args.dtype, group_size=args.kv_group,
                     spec_room=max(args.gamma + 1, args.fixed_rows))
    out = speculative_generate(params, draft, config, tokens, lengths, gamma=args.gamma,
                               max_new_tokens=args.max_new_tokens, cache_spec=spec, method=method,
                               sampling=sampling, rng=rng, opts=opts, on_tokens=stream)
    stats = {"method": method.name, **extra, **out.stats.summary(args.gamma)}
    return out, stats


def load_or_make_draft(args, config, params, recipe):
    """The draft saved beside the checkpoint, or a new one (saved for next time)."""
    try:
        from qspec_jax.draft_io import get_or_make_draft
    except ImportError:  # pragma: no cover - draft_io not available
        get_or_make_draft = None
    ckpt = args.checkpoint
    if ckpt is None:
        from qspec_jax.default_model import default_checkpoint_dir

        ckpt = str(default_checkpoint_dir())
    if get_or_make_draft is not None:
        return get_or_make_draft(ckpt, params, config, recipe)
    from qspec_jax.draft import make_draft

    return make_draft(params, recipe)


class TextStreamer:
    """Host callback printing row 0's text as tokens arrive (decodes the whole prefix
    each time, so multi-token characters come out whole)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens, counts):
        import numpy as np

        self.ids.extend(int(t) for t in np.asarray(tokens)[0, : int(np.asarray(counts)[0])])
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    # a static jit argument: hash by identity is fine (one streamer per run)


if __name__ == "__main__":
    sys.exit(main())
