"""On-disk checkpoint format: safetensors shards, JSON manifest, sha256, atomic commit, verify.

    RUN_DIR/ckpt/
      latest                      "step-00000200\n", replaced atomically after each commit
      step-00000200/              one committed checkpoint (renamed into place from .tmp-step-...)
        manifest.json             format, step, world size, files (rank, bytes, sha256, tensors), PEC, PLT, meta
        rank-00000.safetensors    the tensors rank 0 wrote (its balanced share); shares over 1 GiB
        rank-00000-1.safetensors  are split into files of about 1 GiB (written and hashed in parallel)
      .tmp-step-00000300-<uid>/   a checkpoint being written; never read, removed at the next start
      abandoned/                  checkpoints of a timeline that a resume from an older step left behind
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

FORMAT = "moestack.ckpt/v1"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d{8,})$")
_CHUNK = 8 << 20  # reads (verify)
# Bytes per write/hash call of write_shard, and files written at once per rank. On an H200 machine's local
# disk (1.4 GB/s) a 12.7 GB share persisted in 10.7 s at 8 MiB x 4 and 13.8 s at 64 MiB x 2 (one run each,
# commit da91f15); both are disk-bound. Larger calls take the GIL fewer times.
WRITE_CHUNK = 64 << 20
EARLY_WRITEBACK = True  # start each chunk's writeback as soon as it is written (see `_start_writeback`)
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or read; the message names the file and the problem."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint at `step`: step-00000042."""
    return f"step-{step:08d}"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the manifest's dtype spelling."""
    return str(dtype).removeprefix("torch.")


def shard_name(rank: int, index: int = 0) -> str:
    """File name of a rank's shard: rank-00003.safetensors, then rank-00003-1.safetensors, ... when split."""
    return f"rank-{rank:05d}.safetensors" if index == 0 else f"rank-{rank:05d}-{index}.safetensors"


FILE_BYTES = 1 << 30  # a rank's share is split into files of about this size, written and hashed in parallel
WRITERS = 2


def split_by_bytes(keys: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive groups of keys of at most `limit` bytes each (a larger tensor gets a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        if groups[-1] and size + nbytes[key] > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes[key]
    return groups


def check_dtype(name: str, t: torch.Tensor) -> None:
    """CheckpointError unless t's dtype has a safetensors encoding."""
    if dtype_name(t.dtype) not in _ST_DTYPES:
        raise CheckpointError(f"cannot checkpoint {name!r}: dtype {dtype_name(t.dtype)} has no safetensors "
                              f"encoding here (supported: {', '.join(_ST_DTYPES)}); convert it before saving")


def write_shards(directory: Path, rank: int, tensors: dict[str, torch.Tensor],
                 limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Write a rank's tensors as safetensors files of about `limit` bytes, in parallel: {file: {bytes, sha256, keys}}.

    One file's sha256 is sequential, so one big file is bound by one hashing core; several files use
    several (hashlib and writes release the GIL) and keep the disk busy.
    """
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    groups = split_by_bytes(sorted(tensors), nbytes, FILE_BYTES if limit is None else limit)
    names = [shard_name(rank, i) for i in range(len(groups))]
    with ThreadPoolExecutor(min(WRITERS, len(groups))) as pool:
        recs = list(pool.map(lambda ng: write_shard(directory / ng[0], {k: tensors[k] for k in ng[1]}),
                             zip(names, groups)))
    return {name: {**rec, "keys": group} for name, rec, group in zip(names, recs, groups)}


def part_name(rank: int) -> str:
    """File name of a rank's manifest part (written last, after its shard is on disk)."""
    return f"rank-{rank:05d}.json"


# ---------------------------------------------------------------------------- durable writes


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def dumps(obj: Any) -> str:
    """Indented JSON with arrays of numbers kept on one line (readable manifests of [L, E] arrays)."""
    text = json.dumps(obj, indent=1)
    return _NUM_ARRAY.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


_NUM_ARRAY = re.compile(r"\[[\s\d,.eE+-]*\]")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write CPU tensors as one safetensors file, fsync it; return {bytes, sha256}.

    One pass straight from the tensors' memory (no serialised copy, no re-read): each chunk is hashed on
    a helper thread while the next write runs (hashlib and file writes release the GIL), so the file costs
    about max(hash, write) rather than copy + write + re-read + hash. The file is standard safetensors
    (header: {name: {dtype, shape, data_offsets}}, padded to 8 bytes); safetensors' own reader loads it.
    """
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        check_dtype(name, t)
        header[name] = {"dtype": _ST_DTYPES[dtype_name(t.dtype)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with ThreadPoolExecutor(1) as hasher, open(path, "wb", buffering=0) as f:
        pending, written = None, 0
        for chunk in _chunks([struct.pack("<Q", len(head)) + head] + [_raw_bytes(tensors[n]) for n in names]):
            if pending is not None:
                pending.result()  # sha256 is sequential: chunk i-1 before chunk i
            pending = hasher.submit(digest.update, chunk)
            _write_all(f, chunk)
            _start_writeback(f.fileno(), written, len(chunk))
            written += len(chunk)
        if pending is not None:
            pending.result()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a just-written range to disk now, without waiting for it.

    Buffered writes only fill the page cache; left alone, the disk sees the data at the final fsync, so a
    shard costs (copy into the cache) + (flush at disk speed) one after the other. POSIX_FADV_DONTNEED on
    Linux starts writeback of the range's dirty pages (and drops pages already clean), so the disk writes
    while the next chunks are copied and hashed; the fsync then waits only for the tail. EARLY_WRITEBACK
    turns it off (for comparison); elsewhere than Linux it is a no-op.
    """
    if EARLY_WRITEBACK and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # only a hint: a file system that refuses it still gets the final fsync
            pass


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


def _chunks(buffers: list[memoryview | bytes]):
    for buf in buffers:
        view = memoryview(buf)
        for start in range(0, len(view), WRITE_CHUNK):
            yield view[start:start + WRITE_CHUNK]


def _write_all(f, view: memoryview) -> None:
    while view:
        view = view[f.write(view):]


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically publish a fully written, fsynced checkpoint directory."""
    fsync_path(tmp_dir)
    os.rename(tmp_dir, final_dir)
    fsync_path(final_dir.parent)


def read_latest(root: Path) -> str | None:
    """Name the `latest` pointer holds, or None when there is none (or it is unreadable)."""
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if STEP_RE.match(name) else None


def write_latest(root: Path, name: str | None) -> None:
    """Point `latest` at checkpoint `name` atomically; None removes the pointer."""
    if name is None:
        (root / LATEST).unlink(missing_ok=True)
        fsync_path(root)
        return
    tmp = root / f".latest.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_path(root)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory; renamed away first so a crash never leaves half a `step-*`."""
    trash = path.with_name(f".trash-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def move_aside(path: Path, uid: str) -> Path:
    """Move a committed checkpoint of an abandoned timeline to `abandoned/` (kept, never read)."""
    dest_root = path.parent / "abandoned"
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / f"{path.name}-{uid}"
    os.rename(path, dest)
    fsync_path(path.parent)
    return dest


def clean_leftovers(root: Path) -> list[str]:
    """Remove what killed saves leave behind (.tmp-*, .trash-*, temp pointer files); return their names."""
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".tmp-", ".trash-", ".latest.tmp-")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def list_committed(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root` as (step, dir), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


# ---------------------------------------------------------------------------- reading


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """Parse and sanity-check `manifest.json`; CheckpointError names the file and what is wrong."""
    path = ckpt_dir / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{_rel(path)}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{_rel(path)}: unreadable ({e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{_rel(path)}: unreadable, truncated or not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{_rel(path)}: not a moestack manifest (a JSON {type(manifest).__name__})")
    missing = [k for k in ("format", "step", "world_size", "files", "pec", "experts") if k not in manifest]
    if missing:
        raise CheckpointError(f"{_rel(path)}: not a moestack manifest (missing {missing})")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"{_rel(path)}: format {manifest['format']!r}, expected {FORMAT!r}")
    problem = structure_problem(manifest)
    if problem:
        raise CheckpointError(f"{_rel(path)}: damaged manifest ({problem})")
    return manifest


def structure_problem(m: dict[str, Any]) -> str | None:
    """The first field of a parsed manifest with the wrong type or shape (None when it is well formed)."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(m["step"]) or m["step"] < 0 or not is_int(m["world_size"]) or m["world_size"] < 1:
        return "step or world_size is not a non-negative integer"
    if not isinstance(m["files"], dict) or not m["files"]:
        return "files is not a non-empty object"
    for fname, rec in m["files"].items():
        if not (isinstance(rec, dict) and is_int(rec.get("bytes")) and isinstance(rec.get("sha256"), str)
                and isinstance(rec.get("tensors"), dict)):
            return f"files[{fname!r}] lacks bytes, sha256 or tensors"
        if "/" in fname or fname.startswith("."):
            return f"file name {fname!r} is not a plain name in the checkpoint directory"
    pec, experts = m["pec"], m["experts"]
    if not (isinstance(pec, dict) and isinstance(pec.get("selected"), list) and is_int(pec.get("num_experts"))
            and isinstance(pec.get("state"), dict)):
        return "pec lacks selected, num_experts or state"
    if not isinstance(experts, dict) or not all(isinstance(v, dict) and is_int(v.get("layer")) for v in experts.values()):
        return "experts is not an object of {layer, ...} records"
    E = pec["num_experts"]
    if E < 1 or not all(isinstance(row, list) and all(is_int(e) and 0 <= e < E for e in row) for row in pec["selected"]):
        return f"pec.selected is not a list of expert ids in [0, {E}) per MoE layer"
    L, state = len(pec["selected"]), pec["state"]
    if state.get("shape") != [L, E]:
        return f"pec.state.shape is {state.get('shape')!r}, expected [{L}, {E}]"
    for key in ("processed", "lost", "copy_step", "copy_processed", "copy_lost"):
        rows = state.get(key)
        if not (isinstance(rows, list) and len(rows) == L
                and all(isinstance(r, list) and len(r) == E and all(is_int(v) for v in r) for r in rows)):
            return f"pec.state.{key} is not {L} x {E} integers"
    for name, info in experts.items():
        if not (info.get("num_experts") == E and isinstance(info.get("shape"), list)
                and all(is_int(d) and d >= 0 for d in info["shape"]) and info.get("dtype") in _ST_DTYPES):
            return f"experts[{name!r}] lacks a valid num_experts ({E}), shape or dtype"
    held = {key for rec in m["files"].values() for key in rec["tensors"]}
    for name, info in experts.items():  # every expert the manifest says it holds is in some file
        layer = info["layer"]
        if not 0 <= layer < len(pec["selected"]):
            return f"expert tensor {name!r} is in MoE layer {layer}, pec.selected has {len(pec['selected'])} layers"
        lost = [e for e in pec["selected"][layer] if expert_key(name, e) not in held]
        if lost:
            return f"experts {lost} of {name!r} are selected but in no file"
    return None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (raises ValueError when the file is cut short)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > path.stat().st_size - 8:
            raise ValueError("header length exceeds the file")
        return json.loads(f.read(size))


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint directory and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path) -> "Checkpoint":
        """Read the manifest of `path` (CheckpointError if unreadable)."""
        return cls(Path(path), read_manifest(Path(path)))

    @property
    def step(self) -> int:
        """Training step the checkpoint holds."""
        return int(self.manifest["step"])

    @property
    def lineage(self) -> str:
        """Id shared by the checkpoints of one training timeline."""
        return str(self.manifest.get("lineage", ""))

    def held(self, layer: int) -> set[int]:
        """Global expert ids of MoE layer `layer` that this checkpoint holds."""
        return set(self.manifest["pec"]["selected"][layer])

    def locate(self) -> dict[str, str]:
        """Tensor key -> file name, over all shard files."""
        return {key: fname for fname, rec in self.manifest["files"].items() for key in rec["tensors"]}


def expert_key(name: str, expert: int) -> str:
    """Key of one expert's slice of an expert-stacked tensor in a shard file."""
    return f"{name}#{expert}"


def read_tensors(ckpt: Checkpoint, keys: list[str], handles: dict[Path, Any]) -> dict[str, torch.Tensor]:
    """Read tensors by key from `ckpt`'s shards; `handles` caches open files (caller closes via clear)."""
    where = ckpt.locate()
    out = {}
    for key in keys:
        if key not in where:
            raise CheckpointError(f"{_rel(ckpt.path / MANIFEST)}: no tensor {key!r}")
        path = ckpt.path / where[key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        out[key] = handles[path].get_tensor(key)
    return out


# ---------------------------------------------------------------------------- verification


def verify(ckpt_dir: Path | str) -> list[str]:
    """Problems found in one checkpoint directory (empty when intact): every file, size, sha256, tensor."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for fname, rec in sorted(manifest["files"].items()):
        problems += _verify_file(ckpt_dir / fname, rec)
    return problems


def _verify_file(path: Path, rec: dict[str, Any]) -> list[str]:
    where = _rel(path)
    if not path.is_file():
        return [f"{where}: missing"]
    size = path.stat().st_size
    if size != rec["bytes"]:
        return [f"{where}: size {size} bytes, manifest says {rec['bytes']} (truncated or replaced)"]
    digest = sha256_file(path)
    if digest != rec["sha256"]:
        return [f"{where}: sha256 mismatch (manifest {rec['sha256'][:12]}..., file {digest[:12]}...): tampered or corrupt"]
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as e:
        return [f"{where}: unreadable safetensors header ({e})"]
    return [msg for key, info in rec["tensors"].items() if (msg := _check_tensor(where, key, info, header))]


def _check_tensor(where: str, key: str, info: dict[str, Any], header: dict[str, Any]) -> str | None:
    entry = header.get(key)
    if entry is None:
        return f"{where}: missing tensor {key!r}"
    if list(entry["shape"]) != list(info["shape"]):
        return f"{where}: tensor {key!r} has shape {entry['shape']}, manifest says {info['shape']}"
    want = _ST_DTYPES.get(info["dtype"])
    if want is not None and entry["dtype"] != want:
        return f"{where}: tensor {key!r} has dtype {entry['dtype']}, manifest says {info['dtype']}"
    return None


def _rel(path: Path) -> str:
    """How messages name a file: its full path, so the user can go and look at it."""
    return str(path)
