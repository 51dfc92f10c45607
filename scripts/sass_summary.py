#!/usr/bin/env python
"""Summarize Nsight Compute's per-instruction SASS counters for our kernels.

  ncu --kernel-name regex:hier_attention --launch-count 2 --section SourceCounters \\
      -f -o /tmp/at python3 scripts/ncu_kernels.py --skip-mm --context 32768 --calls 1
  ncu -i /tmp/at.ncu-rep --page source --csv --print-source sass > sass.csv
  python3 scripts/sass_summary.py sass.csv [--loop]

Per kernel in the CSV: executed instructions and warp stall samples by opcode, the stall
reasons, and the size of the hottest loop body (instructions executed the most times).
--loop also lists the loop body's instructions with their stall samples. This is what
found session 6's stall: two 2-byte loads per tile that Triton could not make async.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys


def kernels(path):
    """[(name, [row dict per SASS instruction])] in the CSV's order."""
    out, hdr = [], None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                out.append((row[1] if len(row) > 1 else "?", []))
                hdr = None
            elif row[0] == "Address":
                hdr = row
            elif hdr and out:
                out[-1][1].append(dict(zip(hdr, row)))
    return out


def num(x) -> float:
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def opcode(src: str) -> str:
    parts = src.split()
    if parts and parts[0].startswith("@"):  # predicate guard
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else "?"


def summarize(name, ins, top=25, show_loop=False):
    execd = [num(i.get("Instructions Executed")) for i in ins]
    samples = [num(i.get("Warp Stall Sampling (All Samples)")) for i in ins]
    tot_e, tot_s = sum(execd) or 1.0, sum(samples) or 1.0
    stall_cols = [c for c in (ins[0] if ins else {}) if c.startswith("stall_") and "Not Issued" not in c]
    stalls = collections.Counter({c[6:]: sum(num(i[c]) for i in ins) for c in stall_cols})
    by = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for i, e, s in zip(ins, execd, samples):
        b = by[opcode(i.get("Source", ""))]
        b[0] += e
        b[1] += s
        b[2] += 1
    counts = collections.Counter(e for e in execd if e > 0)
    hot = max(counts, key=lambda e: (e * counts[e], e)) if counts else 0
    body = [k for k, e in enumerate(execd) if e == hot]
    print(f"\n== {name}: {len(ins)} SASS instructions, {tot_e:,.0f} executed (warp-level), {tot_s:,.0f} stall samples")
    print("stalls: " + ", ".join(f"{k} {100 * v / tot_s:.0f}%" for k, v in stalls.most_common(10)))
    print(f"hottest loop body: {len(body)} instructions executed {hot:,.0f} times each "
          f"({100 * hot * len(body) / tot_e:.0f}% of all executed)")
    print(f"{'opcode':10s} {'exec %':>7s} {'stall %':>8s} {'static':>7s}")
    for op, (e, s, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{op:10s} {100 * e / tot_e:7.1f} {100 * s / tot_s:8.1f} {n:7d}")
    if show_loop:
        for k in body:
            i = ins[k]
            why = max(((num(i[c]), c[6:]) for c in stall_cols), default=(0, ""))
            print(f"  {k:5d} {samples[k]:6.0f} {why[1][:14]:14s} {i.get('Source', '')[:100]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass > this file")
    ap.add_argument("--loop", action="store_true", help="list the hottest loop body's instructions")
    ap.add_argument("--top", type=int, default=25, help="opcodes listed per kernel")
    args = ap.parse_args()
    ks = kernels(args.csv)
    if not ks:
        print(f"no 'Kernel Name' blocks in {args.csv}: is it ncu's --page source --csv output?")
        return 1
    for name, ins in ks:
        summarize(name, ins, args.top, args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
