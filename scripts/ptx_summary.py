#!/usr/bin/env python
"""Count the instruction kinds of our Pallas kernels in an XLA dump's PTX.

  XLA_FLAGS=--xla_dump_to=/tmp/xd python3 scripts/ncu_kernels.py --context 32768 --calls 1
  python3 scripts/ptx_summary.py /tmp/xd --copy-to $OUT/ptx

Answers questions such as "did Triton pipeline these loads" (cp.async + wait_group mean a
multi-stage copy into shared memory; plain ld.global inside the loop means the warp stalls
on each tile) and "how many shared-memory round trips per tile" (st/ld.shared, bar.sync).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys

# (label, regex on the instruction's opcode); the first match wins.
KINDS = [
    ("cp.async", r"^cp\.async\.(ca|cg)"),
    ("cp.async.wait/commit", r"^cp\.async\.(wait|commit)"),
    ("cp.async.bulk (TMA)", r"^cp\.async\.bulk"),
    ("ld.global", r"^ld\.global"),
    ("st.global", r"^st\.global"),
    ("ld.shared", r"^ld\.shared"),
    ("st.shared", r"^st\.shared"),
    ("ldmatrix", r"^ldmatrix"),
    ("mma/wgmma", r"^(mma|wgmma)"),
    ("bar.sync", r"^(bar\.sync|barrier)"),
    ("prmt", r"^prmt"),
    ("lop3", r"^lop3"),
    ("cvt", r"^cvt"),
    ("fma/mul/add f32", r"^(fma|mul|add|sub)\.(rn\.)?f32"),
    ("ex2", r"^ex2"),
]


def entries(text: str):
    """Yield (name, body) per .entry in a PTX file."""
    for m in re.finditer(r"\.entry\s+([\w$]+)\s*\(", text):
        start = m.end()
        nxt = text.find(".entry", start)
        yield m.group(1), text[start:nxt if nxt >= 0 else len(text)]


def count(body: str):
    c = collections.Counter()
    vec = collections.Counter()
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "$")):
            continue
        s = re.sub(r"^@!?%p\d+\s+", "", s)  # predicate guard
        op = s.split()[0] if s.split() else ""
        for label, rx in KINDS:
            if re.match(rx, op):
                c[label] += 1
                if label in ("ld.global", "cp.async"):
                    w = re.search(r"\.v(\d)", op)
                    bits = re.search(r"\.(b|u|f|s)(8|16|32|64|128)\b", op)
                    size = (int(w.group(1)) if w else 1) * (int(bits.group(2)) // 8 if bits else 0)
                    if label == "cp.async":
                        m = re.search(r",\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]", s)
                        size = int(m.group(1), 0) if m else size
                    vec[(label, size)] += 1
                break
        c["total"] += 1
    return c, vec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump_dir")
    ap.add_argument("--match", default="int4_matmul|hier_attention", help="regex on the entry name")
    ap.add_argument("--copy-to", default="", help="copy the PTX files that hold a match here")
    args = ap.parse_args()
    files = [os.path.join(r, f) for r, _, fs in os.walk(args.dump_dir) for f in fs if f.endswith(".ptx")]
    if not files:
        print(f"no .ptx files under {args.dump_dir}: {sorted(os.listdir(args.dump_dir))[:20]}")
        return 1
    seen = set()
    rows = []
    for path in sorted(files):
        text = open(path, errors="replace").read()
        hit = False
        for name, body in entries(text):
            if not re.search(args.match, name) or (name, len(body)) in seen:
                continue
            seen.add((name, len(body)))
            hit = True
            c, vec = count(body)
            rows.append((name, os.path.basename(path), c, vec))
        if hit and args.copy_to:
            os.makedirs(args.copy_to, exist_ok=True)
            shutil.copy(path, args.copy_to)
    if not rows:
        print(f"no entry matches {args.match!r} in {len(files)} .ptx files")
        return 1
    for name, fname, c, vec in rows:
        print(f"\n{name}  ({fname})")
        print("  " + ", ".join(f"{k} {c[k]}" for k, _ in KINDS if c[k]) + f", total {c['total']}")
        print("  load widths (bytes per instruction): " +
              ", ".join(f"{lab} {size}B x{n}" for (lab, size), n in sorted(vec.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
