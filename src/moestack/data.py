"""Data: the embedded default corpus, a byte-level tokenizer, and deterministic batches.

The default corpus is the Python standard library's own source, found through `sysconfig`, so the
default run needs no download. Tokens are cached once under the user cache directory.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MAX_BYTES = 8 << 20  # the first 8 MiB of the standard library (sorted paths): ample for the default run
VAL_FRACTION = 0.05
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".toml", ".cfg", ".c", ".h", ".html", ".csv", ".tex"}


class DataError(ValueError):
    """A data path that is missing, empty or unreadable."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary of 256, nothing to train or download."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a stable order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def user_files(path: Path) -> list[Path]:
    """A user's text file, or the text files under a folder, in a stable order."""
    if not path.exists():
        raise DataError(f"data {path} (train.data, --data): no such file or folder; pass a text file or a folder of "
                        "text files (a trained run reads the path its config.toml names: restore it there)")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"--data {path}: the folder holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def cache_dir() -> Path:
    base = os.environ.get("MOESTACK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moestack"
    )
    return Path(base)


def load_tokens(data: str = "", max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """All tokens (uint8) of the corpus: the stdlib by default, else the user's path; cached once."""
    files = user_files(Path(data)) if data else stdlib_files()
    key = hashlib.sha256()
    for f in files:
        st = f.stat()
        key.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    key.update(str(max_bytes).encode())
    cached = cache_dir() / f"tokens-{key.hexdigest()[:20]}.npy"
    if cached.is_file():
        return np.load(cached)
    tokens = _read_bytes(files, max_bytes)
    if tokens.size == 0:
        raise DataError(f"--data {data or 'stdlib'}: the corpus is empty; give a non-empty text file")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cached)
    return tokens


def _read_bytes(files: list[Path], max_bytes: int) -> np.ndarray:
    chunks, total = [], 0
    for f in files:
        blob = f.read_bytes()[: max_bytes - total]
        chunks.append(blob)
        total += len(blob)
        if total >= max_bytes:
            break
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8).copy()


@dataclass
class Corpus:
    """A deterministic train/val split of a token stream, and the batches of any step."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int

    @classmethod
    def load(cls, data: str, seq_len: int, max_mb: int = DEFAULT_MAX_BYTES >> 20) -> "Corpus":
        tokens = load_tokens(data, max_mb << 20)
        n_val = max(int(len(tokens) * VAL_FRACTION), seq_len + 2)
        if len(tokens) - n_val < seq_len + 2:
            raise DataError(
                f"--data {data or 'stdlib'}: {len(tokens)} tokens are too few for seq_len={seq_len}; "
                f"give at least {2 * (seq_len + 2) + 1} bytes of text or lower model.seq_len"
            )
        return cls(tokens[:-n_val], tokens[-n_val:], seq_len)

    def batch(self, split: str, step: int, batch_size: int, seed: int, rows: slice = slice(None)):
        """Rows `rows` of the global batch for `step`: (x, y) int64 [b, S]; the same on every rank."""
        src = self.train if split == "train" else self.val
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(0, len(src) - self.seq_len - 1, size=batch_size)[rows]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = torch.from_numpy(src[idx].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]
