"""Evaluation text: loading documents and the PG-19 chunking protocol."""

import json

import numpy as np
import pytest

from qspec_jax.data import (DataError, Document, calibration_chunks, chunk_tokens, default_data_path,
                            load_documents, pg19_chunks, tokenize_documents)


class WordTokenizer:
    """One token per whitespace-separated word: token id = the word's number."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


def book(start, n):
    return " ".join(str(i) for i in range(start, start + n))


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_load_jsonl_txt_and_directories(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "one two", "book_id": "7"}, {"text": "   "}, {"text": "x"}])
    docs = load_documents(f)
    assert [d.text for d in docs] == ["one two", "x"] and docs[0].name == "7"
    (tmp_path / "b.txt").write_text("a plain book\n")
    (tmp_path / "notes.md").write_text("ignored")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["one two", "x", "a plain book\n"]
    assert load_documents(tmp_path / "b.txt")[0].name == "b.txt"
    assert len(load_documents(tmp_path, limit=1)) == 1


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_documents(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_documents(tmp_path / "empty.txt")
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"nofield.jsonl:2: no 'text' field"):
        load_documents(tmp_path / "nofield.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_documents(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match="not a string"):
        load_documents(tmp_path / "num.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        load_documents(tmp_path / "blank.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        load_documents(tmp_path / "d")


def test_pg19_protocol_skip_and_round_robin():
    tok = WordTokenizer()
    docs = [Document("a", book(0, 100)), Document("b", book(1000, 60)), Document("c", book(5000, 15))]
    ch = pg19_chunks(tok, docs, prompt_len=8, n_chunks=6, skip=10, continuation=2)
    assert ch.shape == (6, 10) and ch.dtype == np.int32
    # chunk 0 of a, b (c has only 5 tokens after the skip), then chunk 1 of a, b, then chunk 2
    assert ch[:, 0].tolist() == [10, 1010, 20, 1020, 30, 1030]
    assert ch[0].tolist() == list(range(10, 20))
    with pytest.raises(DataError, match="only 14 chunks"):  # a: 9, b: 5, c: 0
        pg19_chunks(tok, docs, prompt_len=8, n_chunks=15, skip=10, continuation=2)
    with pytest.raises(ValueError):
        pg19_chunks(tok, docs, prompt_len=0, n_chunks=1)


def test_lazy_tokenization_takes_a_prefix():
    calls = []

    class Counting(WordTokenizer):
        def __call__(self, text, add_special_tokens=False):
            calls.append(len(text))
            return super().__call__(text)

    text = book(0, 200000)  # ~1.3M characters
    ids = tokenize_documents(Counting(), [text], max_tokens=1000)[0]
    assert ids.tolist() == list(range(1000))
    assert max(calls) < len(text) // 10
    assert chunk_tokens([np.arange(25)], 10, 2, skip=3).tolist() == [list(range(3, 13)), list(range(13, 23))]


def test_calibration_comes_from_the_dropped_prefix():
    docs = [book(0, 20000), book(100000, 20000)]
    cal = calibration_chunks(WordTokenizer(), docs, chunk_len=500, n_chunks=4, start=1000, stop=8000)
    assert cal.shape == (4, 500) and cal.max() < 100000 + 8000
    assert cal[:, 0].tolist() == [1000, 101000, 1500, 101500]
    short = calibration_chunks(WordTokenizer(), [book(0, 1200)], chunk_len=500, n_chunks=2, start=1000)
    assert short[:, 0].tolist() == [0, 500]  # falls back to the whole dropped region


def test_default_data_path(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert default_data_path(repo) is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "pg19_dev.jsonl").write_text('{"text": "x"}\n')
    assert default_data_path(repo) == tmp_path / "shared" / "data" / "pg19_dev.jsonl"
