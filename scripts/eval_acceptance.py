#!/usr/bin/env python
"""Acceptance of QuantSpec vs StreamingLLM self-speculation on long text (PG-19 protocol),
and perplexity of the target with the hierarchical INT8 cache vs the full-precision cache.

    python scripts/eval_acceptance.py [--checkpoint CKPT] [--data FILE|DIR] \
        [--prompt-lens 2048 4096 7168] [--chunks 8] [--gammas 1..8] [--max-new-tokens 128] \
        [--recipes gptq-all-g128] [--compare-recipes rtn-all-g128 rtn-mlp-g64 ...] \
        [--compare-gammas 2 6] [--compare-prompt-lens 2048] [--ppl] [--json OUT.json] [--markdown OUT.md]

Protocol: drop the first 8,000 tokens of every document, cut the rest into chunks of the
prompt length, take chunks round-robin across documents. All chunks of one prompt length
run as one batch; one prefill per prompt length is shared by every gamma, recipe and
method (and by the perplexity check). Greedy decoding; every row generates
--max-new-tokens tokens (no early stop at EOS).

--recipes run at every --gammas; --compare-recipes at --compare-gammas only, at
--compare-prompt-lens (there, before the main recipes). `--recipes best` picks the compare
recipe with the highest mean acceptance at the first prompt length. A recipe is METHOD-SCOPE-gN[-fphead]: rtn|gptq, all|mlp linear
layers, INT4 weight group N along the input dim, -fphead keeps the lm_head full precision.
GPTQ calibrates on chunks of the first 8,000 tokens of each document (the part the
protocol drops), so calibration text never overlaps a prompt. Drafts are saved under
CKPT/drafts/ and reused.

Exit status 2 with a one-line message on bad arguments or data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

try:
    import qspec_jax  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Q4_1_NOTE = ("SmolLM2-135M-Instruct's weights come from a Q4_1 GGUF: they already lie on an asymmetric "
             "4-bit grid with blocks of 32 along the input dimension. An INT4 draft with group 32 would "
             "reproduce them exactly and inflate acceptance; groups of 64 and 128 (the paper's) are "
             "reported, and g32 is refused unless --allow-g32.")


def _gammas(values: list[str]) -> list[int]:
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            if ".." in part:
                lo, hi = part.split("..", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="qspec-jax checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", help="JSONL with a 'text' field, a .txt file, or a directory of them "
                                   "(default: ../shared/data/pg19_dev.jsonl beside the repository, if present)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--chunks", type=int, default=8, help="prompt chunks per prompt length (one batch)")
    ap.add_argument("--skip", type=int, default=8000, help="tokens dropped at the start of every document")
    ap.add_argument("--gammas", nargs="+", default=["1..8"], help="e.g. 1..8 or 1 2 4 6")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--recipes", nargs="*", default=["gptq-all-g128"],
                    help="QuantSpec draft recipes run at every gamma (first = the headline recipe); 'best' = "
                         "the --compare-recipes recipe with the highest mean acceptance at the first prompt length")
    ap.add_argument("--compare-recipes", nargs="*", default=[],
                    help="more recipes, run at --compare-gammas and --compare-prompt-lens only")
    ap.add_argument("--compare-gammas", nargs="+", default=["2", "6"])
    ap.add_argument("--compare-prompt-lens", type=int, nargs="*", default=None,
                    help="prompt lengths of the recipe comparison (default: the shortest --prompt-lens)")
    ap.add_argument("--compare-max-new-tokens", type=int, default=None,
                    help="new tokens per row in the recipe comparison (default: --max-new-tokens)")
    ap.add_argument("--kv-group", type=int, default=128, help="KV cache quantization group G")
    ap.add_argument("--streaming-budget", type=float, default=0.25,
                    help="StreamingLLM draft window as a fraction of the prompt length")
    ap.add_argument("--sink", type=int, default=4, help="StreamingLLM attention sinks")
    ap.add_argument("--no-streaming", action="store_true", help="skip the StreamingLLM baseline")
    ap.add_argument("--ppl", action="store_true", help="also perplexity with the int8 vs fp cache")
    ap.add_argument("--ppl-tokens", type=int, default=256, help="tokens scored per chunk after the prompt")
    ap.add_argument("--ppl-block", type=int, default=16, help="tokens per teacher-forced block")
    ap.add_argument("--calib-chunks", type=int, default=8, help="GPTQ calibration chunks")
    ap.add_argument("--calib-len", type=int, default=1024, help="GPTQ calibration chunk length")
    ap.add_argument("--int4-drafts", action="store_true",
                    help="run drafts through the INT4 matmul (default on CPU: dequantized to dense float32, "
                         "the same weight values, far faster there)")
    ap.add_argument("--mode", choices=("replay", "loop"), default="replay",
                    help="replay: every gamma from one exact replay of the greedy rounds (default, far cheaper); "
                         "loop: one speculative decoding loop per gamma")
    ap.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--allow-g32", action="store_true", help="allow weight group 32 (warns: Q4_1 artifact)")
    ap.add_argument("--compile-cache", default=None,
                    help="persistent JAX compilation cache directory (default: <cache root>/jax_compile)")
    ap.add_argument("--json", help="write all results as JSON here (rewritten after every stage)")
    ap.add_argument("--markdown", help="write a markdown report here")
    ap.add_argument("--date", default=None, help="date printed in the report (default: today)")
    ap.add_argument("--machine", default=None, help="machine description for the report")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    ap.add_argument("--from-json", metavar="JSON", nargs="+",
                    help="evaluate nothing: re-render --markdown (and rewrite --json) from earlier --json files "
                         "(merged: the first one's settings, every file's rows), adding --note lines")
    return ap


def validate(ap: argparse.ArgumentParser, args) -> None:
    from qspec_jax.draft_io import parse_recipe

    try:
        args.gamma_list = _gammas(args.gammas)
        args.compare_gamma_list = _gammas(args.compare_gammas)
    except ValueError:
        ap.error(f"bad --gammas/--compare-gammas {args.gammas} {args.compare_gammas}: use integers or A..B")
    for g in args.gamma_list + args.compare_gamma_list:
        if g < 1:
            ap.error(f"gamma must be >= 1, got {g}")
        if g + 1 > args.kv_group:
            ap.error(f"gamma={g}: gamma + 1 must not exceed --kv-group {args.kv_group}")
    if not args.gamma_list:
        ap.error("no gammas")
    if args.kv_group < 2 or args.kv_group % 2:
        ap.error(f"--kv-group must be even and >= 2, got {args.kv_group}")
    for p in args.prompt_lens:
        if p < 1:
            ap.error(f"prompt length must be >= 1, got {p}")
    if args.chunks < 1:
        ap.error(f"--chunks must be >= 1, got {args.chunks}")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.compare_max_new_tokens is None:
        args.compare_max_new_tokens = args.max_new_tokens
    if args.compare_max_new_tokens < 1:
        ap.error(f"--compare-max-new-tokens must be >= 1, got {args.compare_max_new_tokens}")
    if not 0 < args.streaming_budget <= 1:
        ap.error(f"--streaming-budget must be in (0, 1], got {args.streaming_budget}")
    if args.ppl and not 1 <= args.ppl_block <= args.kv_group:
        ap.error(f"--ppl-block must be between 1 and --kv-group {args.kv_group}, got {args.ppl_block}")
    if args.ppl and args.ppl_tokens < 1:
        ap.error(f"--ppl-tokens must be >= 1, got {args.ppl_tokens}")
    if args.compare_prompt_lens is None:
        args.compare_prompt_lens = [min(args.prompt_lens)] if args.compare_recipes else []
    for p in args.compare_prompt_lens:
        if p not in args.prompt_lens:
            ap.error(f"--compare-prompt-lens {p} is not one of --prompt-lens {args.prompt_lens}")
    args.recipe_objs = {}
    if "best" in args.recipes:
        if not args.compare_recipes:
            ap.error("--recipes best needs --compare-recipes to choose from")
        if args.prompt_lens[0] not in args.compare_prompt_lens:
            ap.error("--recipes best: the first --prompt-lens must be one of --compare-prompt-lens")
    for tag in [t for t in args.recipes if t != "best"] + list(args.compare_recipes):
        try:
            r = parse_recipe(tag)
        except ValueError as e:
            ap.error(str(e))
        if r.group_size == 32 and not args.allow_g32:
            ap.error(f"recipe {tag}: weight group 32 matches the Q4_1 grid of the GGUF weights and would be "
                     "artificially exact; use 64 or 128 (or --allow-g32 for another model)")
        args.recipe_objs[tag] = r
    if not args.recipes and not args.compare_recipes and args.no_streaming:
        ap.error("nothing to evaluate (no recipes and --no-streaming)")
    if args.data is None:
        from qspec_jax.data import default_data_path

        d = default_data_path()
        if d is None:
            ap.error("--data is required (no ../shared/data/pg19_dev.jsonl beside the repository)")
        args.data = str(d)
    if not os.path.exists(args.data):
        ap.error(f"--data {args.data}: not found")
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        ap.error(f"--checkpoint {args.checkpoint}: not a directory")


def mb(x: int) -> str:
    return f"{x / 1e6:.1f}"


def render_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Acceptance on PG-19: QuantSpec vs StreamingLLM ({m['model']})", "",
             f"- Command: `{m['command']}`"] + [f"- Also: `{c}`" for c in m.get("extra_commands", [])] + [
             f"- Date: {m['date']}; machine: {m['machine']}; total runtime {m.get('runtime_s', 0) / 60:.0f} min",
             f"- Data: `{m['data']}` ({m['documents']} documents); protocol: drop the first {m['skip']} tokens of "
             f"each document, cut chunks of the prompt length, round-robin across documents; "
             f"{m['chunks']} chunks per prompt length, run as one batch",
             f"- Greedy decoding, {m['max_new_tokens']} new tokens per chunk (no early stop at EOS); recipe "
             f"comparison: {m['compare_max_new_tokens']} new tokens per chunk",
             f"- KV cache: hierarchical INT4/INT8, group G = {m['kv_group']} (keys per channel over G tokens, "
             f"values per token over min(G, head_dim) channels); cache dtype {m['cache_dtype']}",
             f"- StreamingLLM draft: target weights, {m['sink']} sink tokens + a window of "
             f"{m['streaming_budget']:g} x prompt length, full-precision cache",
             f"- QuantSpec draft weights: INT4 asymmetric, group along the input dim (see recipes); "
             f"{'run through the INT4 matmul' if m['int4_drafts'] else 'dequantized to dense float32 for speed on CPU (identical weight values; only the summation order of the matmul differs)'}",
             f"- GPTQ: sequential (quantized inputs), 1% damping, block 128, natural column order, "
             f"{m['calib_chunks']} x {m['calib_len']} calibration tokens from the dropped first {m['skip']} tokens "
             "of the documents",
             f"- Note: {Q4_1_NOTE}",
             "- Statistics: " + ("one speculative decoding loop (`speculative_from_prefill`) per gamma"
                                 if m.get("mode") == "loop" else
                                 "exact replay of the greedy rounds for every gamma from one pass per draft "
                                 "(`qspec_jax.evaluation`, mode 'replay': same rounds and accepted tokens as "
                                 "the loop; tested bitwise against it)"), "",
             "Acceptance rate = accepted draft tokens / (gamma x rounds); tokens/round = (accepted + rounds) / "
             "rounds (the bonus token counts).", ""]
    rows = res["acceptance"]
    head = m["recipes"][0] if m["recipes"] else None
    for p in m["prompt_lens"]:
        qs = {r["gamma"]: r for r in rows if r["prompt_len"] == p and r["recipe"] == head and r["stage"] == "main"}
        st = {r["gamma"]: r for r in rows if r["prompt_len"] == p and r["method"] == "streaming"
              and r["stage"] == "main"}
        if not qs and not st:
            continue
        lines += [f"## Prompt length {p}", ""]
        win = next(iter(st.values()))["window"] if st else None
        lines += [f"| gamma | QuantSpec {head} acceptance | tokens/round | StreamingLLM (window {win}) acceptance "
                  "| tokens/round |", "|---|---|---|---|---|"]
        for g in sorted(set(qs) | set(st)):
            a, b = qs.get(g), st.get(g)
            fa = (f"{a['acceptance_rate']:.3f}", f"{a['tokens_per_round']:.2f}") if a else ("-", "-")
            fb = (f"{b['acceptance_rate']:.3f}", f"{b['tokens_per_round']:.2f}") if b else ("-", "-")
            lines.append(f"| {g} | {fa[0]} | {fa[1]} | {fb[0]} | {fb[1]} |")
        lines.append("")
    comp = [r for r in rows if r["method"] == "quantspec" and r["stage"] == "compare"]
    recipes = list(dict.fromkeys(r["recipe"] for r in comp))
    if comp:
        lines += ["## Draft recipes", "",
                  "Weight bytes one decode step reads (dense tensors counted at 2 bytes, the fp16/bf16 deployment "
                  "dtype; INT4 tensors as packed codes + fp16 scale and minimum; shared tensors such as norms and "
                  "unquantized projections counted in full; the embedding lookup not counted). Target: "
                  f"{mb(m['target_read_bytes'])} MB per step.", ""]
        keys = sorted({(r["prompt_len"], r["gamma"], r["max_new_tokens"]) for r in comp})
        lines.append("| recipe | draft MB/step | vs target | extra MB stored | "
                     + " | ".join(f"P={p} g={g}" for p, g, _ in keys) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(keys))
        for rec in recipes:
            b = m["draft_bytes"].get(rec, {})
            cells = []
            for p, g, n in keys:
                r = next((r for r in comp if r["recipe"] == rec and (r["prompt_len"], r["gamma"], r["max_new_tokens"])
                          == (p, g, n)), None)
                cells.append(f"{r['acceptance_rate']:.3f} / {r['tokens_per_round']:.2f}" if r else "-")
            lines.append(f"| {rec} | {mb(b.get('draft_read_per_step', 0))} | {b.get('draft_read_ratio', 0):.2f} | "
                         f"{mb(b.get('draft_extra_stored', 0))} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: acceptance rate / tokens per round" + (
            f" (new tokens per chunk: {', '.join(str(n) for n in sorted({k[2] for k in keys}))})."), ""]
    if res.get("perplexity"):
        lines += ["## Perplexity: hierarchical INT8 cache vs full-precision cache", "",
                  "Prefix = the prompt (prefilled exactly), then the next tokens scored teacher-forced through the "
                  "cache's decode path, so each scored token reads the cache as decoding would.", "",
                  "| prompt length | tokens scored | fp cache ppl | INT8 cache ppl | change |", "|---|---|---|---|---|"]
        for r in res["perplexity"]:
            lines.append(f"| {r['prompt_len']} | {r['tokens']} | {r['fp_ppl']:.4f} | {r['int8_ppl']:.4f} | "
                         f"{100 * (r['int8_ppl'] / r['fp_ppl'] - 1):+.3f}% |")
        lines.append("")
    if m.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in m["notes"]] + [""]
    return "\n".join(lines)


def print_table(res: dict) -> None:
    print(f"{'P':>6} {'method':<26} {'gamma':>5} {'accept':>7} {'tok/rnd':>8} {'rounds':>7} {'sec':>6}")
    for r in res["acceptance"]:
        print(f"{r['prompt_len']:>6} {r['recipe'][:26]:<26} {r['gamma']:>5} {r['acceptance_rate']:>7.3f} "
              f"{r['tokens_per_round']:>8.2f} {r['rounds']:>7} {r['seconds']:>6.0f}")
    for r in res.get("perplexity", []):
        print(f"ppl P={r['prompt_len']}: fp {r['fp_ppl']:.4f}  int8 {r['int8_ppl']:.4f}  "
              f"({100 * (r['int8_ppl'] / r['fp_ppl'] - 1):+.3f}%)")


def write_outputs(res: dict, args) -> None:
    """Write the results JSON and the markdown report where --json / --markdown say."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(res))


def rerender(ap: argparse.ArgumentParser, args) -> int:
    parts = []
    for path in args.from_json:
        try:
            with open(path) as f:
                part = json.load(f)
            part["meta"], part["acceptance"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--from-json {path}: not a results file ({e})")
        parts.append(part)
    res = parts[0]
    for part in parts[1:]:
        m, pm = res["meta"], part["meta"]
        res["acceptance"] += part["acceptance"]
        res["perplexity"] = res.get("perplexity", []) + part.get("perplexity", [])
        m["draft_bytes"].update(pm.get("draft_bytes", {}))
        m["compare_prompt_lens"] = sorted(set(m.get("compare_prompt_lens", [])) | set(pm.get("compare_prompt_lens", [])))
        m["runtime_s"] = m.get("runtime_s", 0) + pm.get("runtime_s", 0)
        m.setdefault("extra_commands", []).append(pm["command"])
        m.setdefault("notes", []).extend(n for n in pm.get("notes", []) if n not in m.get("notes", []))
    res["meta"].setdefault("notes", [])
    res["meta"]["notes"] += [n for n in args.note if n not in res["meta"]["notes"]]
    write_outputs(res, args)
    print_table(res)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(ap, args)
    validate(ap, args)
    t_start = time.time()

    import jax

    from qspec_jax.checkpoint import load_checkpoint
    from qspec_jax.data import DataError, calibration_chunks, load_documents, pg19_chunks
    from qspec_jax.default_model import cache_root, ensure_default_checkpoint
    from qspec_jax.draft_io import get_or_make_draft, weight_bytes_report
    from qspec_jax.evaluation import acceptance_sweep, perplexity, prefill_caches, sweep_specs
    from qspec_jax.model import params_from_flat

    cc = args.compile_cache or str(cache_root() / "jax_compile")
    try:
        jax.config.update("jax_compilation_cache_dir", cc)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    except Exception as e:  # noqa: BLE001
        print(f"warning: no persistent compilation cache ({e})", file=sys.stderr)

    from tqdm import tqdm

    try:
        docs = load_documents(args.data)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt = args.checkpoint or str(ensure_default_checkpoint())
    config, flat, tokenizer = load_checkpoint(ckpt)
    import jax.numpy as jnp

    target = params_from_flat(flat, config, jnp.float32)
    del flat
    model_name = os.path.basename(os.path.normpath(ckpt))

    per_g = 1 if args.mode == "replay" else None
    n_main = (per_g or len(args.gamma_list)) * (len(args.recipes) + (0 if args.no_streaming else 1))
    n_comp = (per_g or len(args.compare_gamma_list)) * len(args.compare_recipes)
    total = len(args.prompt_lens) * n_main + len(args.compare_prompt_lens) * n_comp
    bar = tqdm(total=total, desc="speculative runs", disable=args.no_progress, dynamic_ncols=True)

    def say(msg):
        if msg.startswith("run "):
            bar.set_postfix_str(msg[4:64])
            bar.update(1)
        bar.write(msg)

    # drafts (loaded from CKPT/drafts or made once and saved)
    drafts, draft_bytes = {}, {}
    calib = None
    if any(r.method == "gptq" for r in args.recipe_objs.values()):
        try:
            calib = calibration_chunks(tokenizer, docs, args.calib_len, args.calib_chunks, stop=args.skip)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for tag, recipe in args.recipe_objs.items():
        t0 = time.time()
        drafts[tag] = get_or_make_draft(ckpt, target, config, recipe,
                                        calib if recipe.method == "gptq" else None, progress=say)
        draft_bytes[tag] = weight_bytes_report(target, drafts[tag], dense_itemsize=2)
        bar.write(f"draft {tag}: {mb(draft_bytes[tag]['draft_read_per_step'])} MB/step "
                  f"({draft_bytes[tag]['draft_read_ratio']:.2f} x target) ready in {time.time() - t0:.0f}s")
    tb = weight_bytes_report(target, dense_itemsize=2)

    res = {"meta": {
        "model": model_name, "checkpoint": ckpt, "data": args.data, "documents": len(docs),
        "command": "python scripts/eval_acceptance.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": args.date or datetime.date.today().isoformat(),
        "machine": args.machine or f"{platform.machine()} {jax.default_backend().upper()} ({os.cpu_count()} cores)",
        "prompt_lens": args.prompt_lens, "chunks": args.chunks, "skip": args.skip, "gammas": args.gamma_list,
        "max_new_tokens": args.max_new_tokens, "recipes": args.recipes, "compare_recipes": args.compare_recipes,
        "compare_gammas": args.compare_gamma_list, "compare_prompt_lens": args.compare_prompt_lens,
        "compare_max_new_tokens": args.compare_max_new_tokens, "kv_group": args.kv_group,
        "streaming_budget": args.streaming_budget, "sink": args.sink, "cache_dtype": args.cache_dtype,
        "int4_drafts": args.int4_drafts, "mode": args.mode, "calib_chunks": args.calib_chunks, "calib_len": args.calib_len,
        "target_read_bytes": tb["target_read_per_step"], "target_stored_bytes": tb["target_stored"],
        "draft_bytes": draft_bytes, "notes": list(args.note)},
        "acceptance": [], "perplexity": []}

    def dump():
        res["meta"]["runtime_s"] = round(time.time() - t_start)
        write_outputs(res, args)

    gmax = max(args.gamma_list + (args.compare_gamma_list if args.compare_recipes else []))
    for p in args.prompt_lens:
        compare_here = p in args.compare_prompt_lens and args.compare_recipes
        cont = args.ppl_tokens if args.ppl else 0
        try:
            chunks = pg19_chunks(tokenizer, docs, p, args.chunks, skip=args.skip, continuation=cont)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        prompts = chunks[:, :p]
        max_new = max(args.max_new_tokens, args.compare_max_new_tokens if compare_here else 0)
        nb = -(-(cont - 1) // args.ppl_block) * args.ppl_block if args.ppl else 0
        kinds = (("int8",) if (args.recipes or compare_here or args.ppl) else ()) + \
                (("fp",) if (not args.no_streaming or args.ppl) else ())
        specs = sweep_specs(p, gmax, max_new, kv_group=args.kv_group, cache_dtype=args.cache_dtype,
                            extra_spec_room=args.ppl_block if args.ppl else 0, extra_capacity=nb, kinds=kinds)
        t0 = time.time()
        lengths = jnp.full((prompts.shape[0],), p, jnp.int32)
        prefilled = prefill_caches(target, config, prompts, lengths, specs)
        jax.block_until_ready(prefilled)
        bar.write(f"prefill {prompts.shape[0]} x {p} tokens: {time.time() - t0:.0f}s")
        common = dict(kv_group=args.kv_group, streaming_budget=args.streaming_budget, sink=args.sink,
                      cache_dtype=args.cache_dtype, dense_drafts=not args.int4_drafts, prefilled=prefilled,
                      specs=specs, progress=say, mode=args.mode, replay_cache={},
                      min_replay_tokens=max_new - 1 + gmax)
        if args.ppl:
            t0 = time.time()
            out = {}
            for kind in ("fp", "int8"):
                out[kind] = perplexity(target, config, chunks, p, specs[kind], args.ppl_block,
                                       prefilled=prefilled[kind])
            res["perplexity"].append({"prompt_len": p, "tokens": out["fp"]["tokens"], "fp_nll": out["fp"]["nll"],
                                      "int8_nll": out["int8"]["nll"], "fp_ppl": out["fp"]["ppl"],
                                      "int8_ppl": out["int8"]["ppl"], "seconds": round(time.time() - t0)})
            bar.write(f"ppl P={p}: fp {out['fp']['ppl']:.4f} int8 {out['int8']['ppl']:.4f}")
            dump()
        if compare_here:
            comp = {t: drafts[t] for t in args.compare_recipes}
            gam = {t: args.compare_gamma_list for t in comp}
            rows = acceptance_sweep(target, config, prompts, drafts=comp, gammas=gam, streaming=False,
                                    max_new_tokens=args.compare_max_new_tokens, **common)
            res["acceptance"] += [dict(r, stage="compare") for r in rows]
            if "best" in args.recipes:
                mean = {t: np.mean([r["acceptance_rate"] for r in rows if r["recipe"] == t]) for t in comp}
                best = max(comp, key=lambda t: (mean[t], -draft_bytes[t]["draft_read_per_step"]))
                args.recipes = [best if t == "best" else t for t in args.recipes]
                args.recipes = list(dict.fromkeys(args.recipes))
                res["meta"]["recipes"] = args.recipes
                res["meta"]["notes"].append(
                    f"Headline recipe {best}: the highest mean acceptance over gammas {args.compare_gamma_list} "
                    f"among the compared recipes at prompt length {p} ("
                    + ", ".join(f"{t} {mean[t]:.3f}" for t in comp) + ").")
                bar.write(f"headline recipe: {best}")
            dump()
        main_drafts = {t: drafts[t] for t in args.recipes}
        if main_drafts or not args.no_streaming:
            rows = acceptance_sweep(target, config, prompts, drafts=main_drafts, gammas=args.gamma_list,
                                    streaming=not args.no_streaming, max_new_tokens=args.max_new_tokens, **common)
            res["acceptance"] += [dict(r, stage="main") for r in rows]
            dump()
        del prefilled
    bar.close()
    dump()
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
