import numpy as np
import pytest

from moestack.data import ByteTokenizer, Corpus, DataError, load_tokens, stdlib_files


def test_default_corpus_is_the_stdlib_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_CACHE", str(tmp_path))
    assert any(p.name == "os.py" for p in stdlib_files())
    a = load_tokens(max_bytes=1 << 16)
    assert a.dtype == np.uint8 and len(a) >= 1 << 15
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1
    b = load_tokens(max_bytes=1 << 16)
    assert np.array_equal(a, b)


def test_batches_are_deterministic_and_rank_slices_tile_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_CACHE", str(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("hello moe world " * 500)
    c = Corpus.load(str(text), seq_len=16)
    x, y = c.batch("train", 3, 8, seed=1)
    x2, _ = c.batch("train", 3, 8, seed=1)
    assert x.shape == (8, 16) and np.array_equal(x, x2)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    top, _ = c.batch("train", 3, 8, seed=1, rows=slice(0, 4))
    bottom, _ = c.batch("train", 3, 8, seed=1, rows=slice(4, 8))
    assert np.array_equal(np.concatenate([top, bottom]), x)


def test_missing_and_empty_data_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="no such file or folder"):
        Corpus.load(str(tmp_path / "missing.txt"), 16)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        Corpus.load(str(empty), 16)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        Corpus.load(str(tmp_path / "dir"), 16)


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("déf x:")) == "déf x:"
