"""The notebooks: quickstart executed end to end (nbclient), all stored without outputs,
and scripts/run_notebook.py (executing a notebook without Jupyter) on a tiny notebook.

long_context.ipynb is not executed here (minutes even with a short prompt on a CPU); it is
run on the GPU machine with scripts/run_notebook.py.
"""

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _text(outputs) -> str:
    parts = []
    for o in outputs:
        if o["output_type"] == "stream":
            parts.append("".join(o["text"]))
        elif o["output_type"] in ("execute_result", "display_data"):
            parts.append("".join(o["data"].get("text/plain", "")))
        elif o["output_type"] == "error":
            parts.append(f"{o['ename']}: {o['evalue']}")
    return "".join(parts)


def _pngs(outputs) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in outputs
            if o["output_type"] in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "long_context.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = _load(NOTEBOOKS / name)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, name
    for c in code:
        assert c["outputs"] == [] and c["execution_count"] is None, (name, "".join(c["source"])[:60])
    assert "run_notebook" not in nb["metadata"]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(smollm2_checkpoint):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
    seconds = time.time() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = _text(outputs)
    assert "autoregressive" in text and "including compilation" in text
    assert "SpecStats.summary: {'gamma': 4" in text and "'acceptance_rate':" in text
    assert "same tokens as autoregressive decoding:" in text
    assert "gamma  acceptance  tokens/round" in text
    for g in range(1, 7):
        assert f"\n{g:5d}  " in text, g
    assert re.search(r"Llama-3.1-8B shape +131072 +16384.0 MiB +\d+\.\d MiB +0\.5\d", text), text[-600:]
    pngs = _pngs(outputs)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) for p in pngs)
    print(f"quickstart.ipynb executed in {seconds:.0f} s")


# ----------------------------------------------------------------------------- run_notebook.py


def _tiny_notebook(cells: list[tuple[str, str, list[str]]]) -> dict:
    out = []
    for i, (kind, src, tags) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"c{i}", "metadata": {"tags": tags} if tags else {},
                "source": src.splitlines(keepends=True)}
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        out.append(cell)
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": out}


def _run_script(tmp_path: Path, nb: dict, *extra: str):
    src, dst = tmp_path / "nb.ipynb", tmp_path / "out" / "nb.ipynb"
    src.write_text(json.dumps(nb))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"), str(src), str(dst), *extra],
                          capture_output=True, text=True, timeout=300)
    return proc, (_load(dst) if dst.exists() else None)


def test_run_notebook_executes_cells_in_one_namespace(tmp_path):
    nb = _tiny_notebook([
        ("markdown", "# title", []),
        ("code", "raise SystemExit('the colab cell must be skipped')", ["colab-install"]),
        ("code", "import os, sys\n%pip install nothing\nif True:\n    !echo nope\nx = 6\nprint('hello', x)\n"
                 "print('warn', file=sys.stderr)\nos.getcwd()", []),
        ("code", "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2], [x, x * 7])\n"
                 "plt.show()\nx * 7", []),
        ("code", "x * 2;", []),
    ])
    proc, out = _run_script(tmp_path, nb)
    assert proc.returncode == 0, proc.stderr
    code = [c for c in out["cells"] if c["cell_type"] == "code"]
    assert code[0]["outputs"] == [] and code[0]["execution_count"] is None  # skipped
    c1, c2, c3 = code[1:]
    assert [c["execution_count"] for c in (c1, c2, c3)] == [1, 2, 3]
    streams = {o["name"]: "".join(o["text"]) for o in c1["outputs"] if o["output_type"] == "stream"}
    assert streams == {"stdout": "hello 6\n", "stderr": "warn\n"}
    result = [o for o in c1["outputs"] if o["output_type"] == "execute_result"]
    assert "".join(result[0]["data"]["text/plain"]) == repr(str(tmp_path.resolve()))  # runs in the notebook's directory
    pngs = _pngs(c2["outputs"])
    assert len(pngs) == 1 and pngs[0].startswith(PNG_MAGIC)
    assert "".join(c2["outputs"][-1]["data"]["text/plain"]) == "42"
    assert c3["outputs"] == []  # a trailing ';' hides the value, as in Jupyter
    assert out["metadata"]["run_notebook"]["status"] == "ok"
    assert "hello 6" in proc.stdout  # echoed while running


def test_run_notebook_stops_at_the_first_error(tmp_path):
    nb = _tiny_notebook([
        ("code", "print('before')", []),
        ("code", "y = 1\nraise ValueError('broken cell')", []),
        ("code", "print('never')", []),
    ])
    proc, out = _run_script(tmp_path, nb, "--quiet")
    assert proc.returncode == 1
    assert "ValueError: broken cell" in proc.stderr
    code = out["cells"]
    assert _text(code[0]["outputs"]) == "before\n"
    err = [o for o in code[1]["outputs"] if o["output_type"] == "error"]
    assert err and err[0]["ename"] == "ValueError" and err[0]["evalue"] == "broken cell"
    assert code[2]["outputs"] == [] and code[2]["execution_count"] is None
    assert out["metadata"]["run_notebook"]["status"] == "failed"
