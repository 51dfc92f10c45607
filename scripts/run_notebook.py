#!/usr/bin/env python
"""Execute a Jupyter notebook without Jupyter: plain Python, one namespace, cells in order.

    python scripts/run_notebook.py NB.ipynb OUT.ipynb [--cwd DIR]

For machines that have matplotlib but no nbclient/ipykernel (the GPU machine). Each code
cell runs in one shared namespace (like a kernel), in the notebook's directory unless
--cwd says otherwise. Skipped: lines starting with `%` or `!` (IPython magics and shell
escapes; replaced by `pass` so blocks stay valid) and whole cells tagged `colab-install`
(cell metadata "tags"). Captured per cell: stdout and stderr (also echoed live), the value
of a final expression (like Jupyter's Out[n]), and every open matplotlib figure (Agg
backend), embedded as image/png. The executed notebook (nbformat 4) is written to OUT.

On the first error: the traceback is printed, the notebook so far is written with the
error as the failing cell's output and `metadata.run_notebook.status = "failed"`, and the
exit status is 1.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

SKIP_TAG = "colab-install"


class _Tee(io.TextIOBase):
    """Collects what a cell writes to a stream and echoes it to the real stream."""

    def __init__(self, echo):
        self.buf = io.StringIO()
        self.echo = echo

    def write(self, s):
        self.buf.write(s)
        if self.echo is not None:
            self.echo.write(s)
            self.echo.flush()
        return len(s)

    def flush(self):
        if self.echo is not None:
            self.echo.flush()

    def isatty(self):
        return False


def cell_source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def strip_magics(source: str) -> str:
    """Replace IPython magics (`%...`) and shell escapes (`!...`) with `pass` at the same indent."""
    out = []
    for line in source.splitlines():
        body = line.lstrip()
        if body.startswith(("%", "!")):
            out.append(line[: len(line) - len(body)] + "pass  # skipped: " + body)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _lines(text: str) -> list[str]:
    """Notebook multi-line string: a list of lines, each but the last ending in a newline."""
    return text.splitlines(keepends=True)


def _figures() -> list[dict]:
    """Every open matplotlib figure as a display_data output (PNG); closes them."""
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt

    outs = []
    for num in plt.get_fignums():
        fig = plt.figure(num)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", dpi=100)
        w, h = fig.get_size_inches() * fig.dpi
        outs.append({"output_type": "display_data", "metadata": {},
                     "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                              "text/plain": [f"<Figure size {w:.0f}x{h:.0f} with {len(fig.axes)} Axes>"]}})
    plt.close("all")
    return outs


def _display_data(obj) -> dict:
    data = {"text/plain": _lines(repr(obj))}
    html = getattr(obj, "_repr_html_", None)
    if callable(html):
        try:
            h = html()
        except Exception:  # noqa: BLE001  (a broken _repr_html_ still shows as text)
            h = None
        if h:
            data["text/html"] = _lines(h)
    return data


def run_cell(source: str, ns: dict, filename: str) -> object:
    """Execute one cell; returns the value of a trailing expression (None if there is none,
    or if the cell ends with `;`, which hides it in Jupyter too)."""
    tree = ast.parse(source, filename=filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not source.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), ns)  # noqa: S102  (running the notebook is the point)
    if last is not None:
        return eval(compile(last, filename, "eval"), ns)  # noqa: S307
    return None


def run_notebook(nb: dict, *, cwd: Path, echo: bool = True, log=sys.stderr) -> tuple[dict, bool]:
    """Execute `nb` (a parsed nbformat-4 dict) in place; -> (nb, ok)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:  # before any cell imports pyplot: never open a window
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    displayed: list = []

    def display(*objs, **_):
        for o in objs:
            displayed.append({"output_type": "display_data", "metadata": {}, "data": _display_data(o)})

    ns["display"] = display
    old_cwd = os.getcwd()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    count = 0
    ok = True
    t_start = time.time()
    code_cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    try:
        for cell in code_cells:
            cell["outputs"] = []
            tags = cell.get("metadata", {}).get("tags", [])
            if SKIP_TAG in tags:
                cell["execution_count"] = None
                print(f"[run_notebook] skipping a {SKIP_TAG!r} cell", file=log)
                continue
            count += 1
            cell["execution_count"] = count
            source = strip_magics(cell_source(cell))
            out_t, err_t = _Tee(sys.stdout if echo else None), _Tee(sys.stderr if echo else None)
            t0 = time.time()
            print(f"[run_notebook] cell {count}/{len(code_cells)}", file=log, flush=True)
            error = None
            value = None
            displayed.clear()
            with contextlib.redirect_stdout(out_t), contextlib.redirect_stderr(err_t):
                try:
                    value = run_cell(source, ns, f"<cell {count}>")
                except BaseException as e:  # noqa: BLE001  (report anything, KeyboardInterrupt included)
                    error = e
                    tb = traceback.format_exception(type(e), e, e.__traceback__)
            for name, tee in (("stdout", out_t), ("stderr", err_t)):
                text = tee.buf.getvalue()
                if text:
                    cell["outputs"].append({"output_type": "stream", "name": name, "text": _lines(text)})
            cell["outputs"].extend(displayed)
            cell["outputs"].extend(_figures())
            if error is None and value is not None:
                cell["outputs"].append({"output_type": "execute_result", "execution_count": count,
                                        "metadata": {}, "data": _display_data(value)})
            cell.setdefault("metadata", {})["run_notebook_seconds"] = round(time.time() - t0, 2)
            if error is not None:
                cell["outputs"].append({"output_type": "error", "ename": type(error).__name__,
                                        "evalue": str(error), "traceback": tb})
                print(f"[run_notebook] cell {count} failed:\n" + "".join(tb), file=log, flush=True)
                ok = False
                break
    finally:
        os.chdir(old_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(cwd))
    nb.setdefault("metadata", {})["run_notebook"] = {
        "status": "ok" if ok else "failed", "seconds": round(time.time() - t_start, 1),
        "executed_cells": count, "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    return nb, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", type=Path, help="the .ipynb to execute")
    ap.add_argument("out", type=Path, help="where to write the executed copy")
    ap.add_argument("--cwd", type=Path, default=None, help="working directory (default: the notebook's)")
    ap.add_argument("--quiet", action="store_true", help="do not echo cell output while running")
    args = ap.parse_args(argv)
    try:
        nb = json.loads(args.notebook.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.notebook}: {e}", file=sys.stderr)
        return 2
    if nb.get("nbformat") != 4:
        print(f"error: {args.notebook} is nbformat {nb.get('nbformat')}, expected 4", file=sys.stderr)
        return 2
    cwd = (args.cwd or args.notebook.resolve().parent).resolve()
    nb, ok = run_notebook(nb, cwd=cwd, echo=not args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    status = "ok" if ok else "FAILED"
    print(f"[run_notebook] {status}: wrote {args.out} ({nb['metadata']['run_notebook']['seconds']} s)",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
