"""Evaluation text: documents from JSONL or .txt files, and PG-19 style prompt chunks.

The paper's PG-19 protocol (QuantSpec / MagicDec): drop the first 8,000 tokens of each
book, cut the rest into consecutive chunks of the prompt length under test. Chunks are
taken round-robin across books (chunk 0 of every book, then chunk 1, ...) so a small
number of chunks still spans several books.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


class DataError(ValueError):
    """Unusable evaluation data (missing path, empty file, JSONL line without text)."""


@dataclass(frozen=True)
class Document:
    """One evaluation text: `name` (a book title or "<file>:<line>") and its `text`."""

    name: str  # "<file>:<line>" for JSONL, the file name for .txt
    text: str


def load_documents(path: str | os.PathLike, *, field: str = "text", limit: int | None = None) -> list[Document]:
    """Documents from a JSONL file (one object per line with a `field` string), a `.txt`
    file (one document), or a directory of `.txt` / `.jsonl` files (sorted by name).

    Raises DataError naming the file (and line) for anything unusable.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{p}: directory has no .txt or .jsonl files")
        docs: list[Document] = []
        for f in files:
            docs.extend(_load_file(f, field))
            if limit is not None and len(docs) >= limit:
                break
    else:
        docs = _load_file(p, field)
    if not docs:
        raise DataError(f"{p}: no documents")
    return docs[:limit] if limit is not None else docs


def _load_file(f: Path, field: str) -> list[Document]:
    if f.suffix.lower() == ".jsonl" or f.suffix.lower() == ".json":
        return _load_jsonl(f, field)
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{f}: file is empty")
    return [Document(f.name, text)]


def _load_jsonl(f: Path, field: str) -> list[Document]:
    docs = []
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{f}:{n}: invalid JSON ({e})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{f}:{n}: no {field!r} field (has {keys})")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{f}:{n}: {field!r} is a {type(text).__name__}, not a string")
            if not text.strip():
                continue  # an empty document contributes no tokens
            name = obj.get("short_book_title") or obj.get("book_id") or f"{f.name}:{n}"
            docs.append(Document(str(name), text))
    if not docs:
        raise DataError(f"{f}: no non-empty {field!r} values (empty file?)")
    return docs


def tokenize_documents(tokenizer, docs: Sequence[Document | str], *, max_tokens: int | None = None) -> list[np.ndarray]:
    """Token ids (int32, no special tokens) of each document.

    max_tokens: tokens needed per document at most; only a prefix of the text that is
    sure to hold them is tokenized (about 8 characters per token, doubled until enough),
    so a 1M-character book is not tokenized whole to take 10K tokens.
    """
    out = []
    for d in docs:
        text = d.text if isinstance(d, Document) else d
        if max_tokens is None:
            out.append(_encode(tokenizer, text))
            continue
        n_chars = max(4096, 8 * max_tokens)
        while True:
            part = text[:n_chars]
            ids = _encode(tokenizer, part)
            if len(ids) > max_tokens or n_chars >= len(text):
                break
            n_chars *= 2
        if n_chars < len(text):
            ids = ids[:-1]  # the last token may be cut mid-word
        out.append(ids[:max_tokens])
    return out


def _encode(tokenizer, text: str) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
    return np.asarray(ids, np.int32)


def chunk_tokens(token_lists: Iterable[np.ndarray], chunk_len: int, n_chunks: int, *, skip: int = 0) -> np.ndarray:
    """Cut each token list (after dropping `skip` tokens) into consecutive chunks of
    `chunk_len`; take chunks round-robin across lists until `n_chunks`. -> int32 [n, chunk_len].

    Raises DataError when the lists hold fewer than n_chunks chunks.
    """
    if chunk_len < 1 or n_chunks < 1:
        raise ValueError(f"chunk_len and n_chunks must be >= 1, got {chunk_len} and {n_chunks}")
    per_doc = []
    for toks in token_lists:
        rest = np.asarray(toks, np.int32)[skip:]
        k = len(rest) // chunk_len
        per_doc.append([rest[i * chunk_len:(i + 1) * chunk_len] for i in range(k)])
    out = []
    depth = 0
    while len(out) < n_chunks:
        added = False
        for chunks in per_doc:
            if depth < len(chunks) and len(out) < n_chunks:
                out.append(chunks[depth])
                added = True
        if not added:
            break
        depth += 1
    if len(out) < n_chunks:
        have = sum(len(c) for c in per_doc)
        raise DataError(f"only {have} chunks of {chunk_len} tokens after skipping {skip} tokens per document; "
                        f"{n_chunks} requested (more or longer documents, a shorter prompt, or fewer chunks)")
    return np.stack(out).astype(np.int32)


def pg19_chunks(tokenizer, docs: Sequence[Document | str], prompt_len: int, n_chunks: int, *, skip: int = 8000,
                continuation: int = 0) -> np.ndarray:
    """The PG-19 protocol: int32 [n_chunks, prompt_len + continuation].

    Drops the first `skip` tokens of every document, cuts the rest into chunks of
    prompt_len + continuation tokens, takes them round-robin across documents.
    Only as much of each document is tokenized as the chunks can use.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if continuation < 0:
        raise ValueError(f"continuation must be >= 0, got {continuation}")
    chunk = prompt_len + continuation
    per_doc_chunks = -(-n_chunks // max(1, len(docs)))
    need = skip + chunk * per_doc_chunks
    # first try with what an even spread needs; if short documents leave a gap, tokenize all
    toks = tokenize_documents(tokenizer, docs, max_tokens=need)
    try:
        return chunk_tokens(toks, chunk, n_chunks, skip=skip)
    except DataError:
        toks = tokenize_documents(tokenizer, docs, max_tokens=skip + chunk * n_chunks)
        return chunk_tokens(toks, chunk, n_chunks, skip=skip)


def calibration_chunks(tokenizer, docs: Sequence[Document | str], chunk_len: int, n_chunks: int, *,
                       start: int = 1000, stop: int = 8000) -> np.ndarray:
    """Calibration text for GPTQ from the part of each book the PG-19 protocol drops
    (tokens [start, stop)), so calibration never overlaps evaluation prompts.
    Falls back to the whole dropped region [0, stop) when [start, stop) is too short."""
    toks = tokenize_documents(tokenizer, docs, max_tokens=stop)
    for lo in (start, 0):
        try:
            return chunk_tokens([t[lo:stop] for t in toks], chunk_len, n_chunks)
        except DataError:
            continue
    raise DataError(f"not enough text for {n_chunks} calibration chunks of {chunk_len} tokens "
                    f"in the first {stop} tokens of {len(toks)} documents")


def default_data_path(repo_root: str | os.PathLike | None = None) -> Path | None:
    """`../shared/data/pg19_dev.jsonl` relative to the repository (a Path), or None if it
    does not exist."""
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parent.parent
    p = root.parent / "shared" / "data" / "pg19_dev.jsonl"
    return p if p.is_file() else None
