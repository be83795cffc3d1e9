import json

import pytest
import torch

from moestack.checkpoint import CheckpointConfig, CheckpointManager, verify
from moestack.checkpoint.storage import MANIFEST, dumps, list_committed, read_safetensors_header

from tests.checkpoint.helpers import make_state


def _one_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    tensors, experts = make_state(3)
    mgr.save(3, tensors, experts, {"step": 3})
    mgr.close()
    (_, path), = list_committed(tmp_path / "ckpt")
    return path


def test_intact_checkpoint_verifies(tmp_path):
    path = _one_checkpoint(tmp_path)
    assert verify(path) == []
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, "rank-00000.safetensors"]


def test_tampered_shard_is_named(tmp_path):
    path = _one_checkpoint(tmp_path)
    shard = path / "rank-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of tensor data: same size, different content
    shard.write_bytes(bytes(data))
    problems = verify(path)
    assert len(problems) == 1 and str(shard) in problems[0] and "sha256 mismatch" in problems[0]


def test_truncated_shard_and_missing_shard(tmp_path):
    path = _one_checkpoint(tmp_path)
    shard = path / "rank-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "size 100 bytes" in verify(path)[0]
    shard.unlink()
    assert verify(path) == [f"{shard}: missing"]


def test_truncated_manifest_is_reported(tmp_path):
    path = _one_checkpoint(tmp_path)
    manifest = path / MANIFEST
    manifest.write_text(manifest.read_text()[:200])
    problems = verify(path)
    assert len(problems) == 1 and str(manifest) in problems[0] and "truncated or not JSON" in problems[0]
    manifest.unlink()
    assert verify(path) == [f"{manifest}: missing"]


def test_manifest_naming_a_missing_tensor(tmp_path):
    path = _one_checkpoint(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    rec = manifest["files"]["rank-00000.safetensors"]
    rec["tensors"]["model.ghost"] = {"name": "model.ghost", "shape": [1], "dtype": "float32"}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert verify(path) == [f"{path / 'rank-00000.safetensors'}: missing tensor 'model.ghost'"]


def _damage(m, how):
    rec = m["files"]["rank-00000.safetensors"]
    if how == "null":
        return None
    if how == "no_sha256":
        del rec["sha256"]
    elif how == "files_list":
        m["files"] = [rec]
    elif how == "no_files":
        m["files"] = {}
    elif how == "pec_empty":
        m["pec"] = {}
    elif how == "expert_in_no_file":
        del rec["tensors"]["model.layers.1.moe.experts.w1#5"]
    elif how == "path_in_name":
        m["files"] = {"../x.safetensors": rec}
    return m


@pytest.mark.parametrize("how", ["null", "no_sha256", "files_list", "no_files", "pec_empty", "expert_in_no_file",
                                 "path_in_name"])
def test_a_damaged_manifest_is_one_named_problem_and_load_falls_back(tmp_path, how):
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    for step in (1, 2):
        tensors, experts = make_state(step)
        mgr.save(step, tensors, experts, {"step": step})
        mgr.wait()
    path = tmp_path / "ckpt" / "step-00000002"
    (path / MANIFEST).write_text(json.dumps(_damage(json.loads((path / MANIFEST).read_text()), how)))
    problems = verify(path)
    assert len(problems) == 1 and str(path / MANIFEST) in problems[0], problems
    _, meta, report = mgr.load()
    assert meta == {"step": 1} and len(report.skipped) == 1


def test_manifest_records_what_the_issue_asks(tmp_path):
    path = _one_checkpoint(tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    assert m["format"] == "moestack.ckpt/v1" and m["step"] == 3 and m["world_size"] == 1
    rec = m["files"]["rank-00000.safetensors"]
    assert rec["rank"] == 0 and len(rec["sha256"]) == 64 and rec["bytes"] == (path / "rank-00000.safetensors").stat().st_size
    w1 = rec["tensors"]["model.layers.1.moe.experts.w1#5"]
    assert w1 == {"name": "model.layers.1.moe.experts.w1", "shape": [4, 6], "dtype": "float32", "layer": 1, "expert": 5}
    assert rec["tensors"]["model.norm.weight"]["dtype"] == "bfloat16"
    assert m["meta"] == {"step": 3} and m["plt"] is None
    header = read_safetensors_header(path / "rank-00000.safetensors")
    assert set(header) - {"__metadata__"} == set(rec["tensors"])


def test_dumps_keeps_number_arrays_on_one_line():
    assert dumps({"a": [[1, 2], [3, 4]]}) == '{\n "a": [\n  [1, 2],\n  [3, 4]\n ]\n}'
    assert json.loads(dumps({"x": [1.5, -2e-05], "s": ["a, b"]})) == {"x": [1.5, -2e-05], "s": ["a, b"]}


def test_shard_bytes_are_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    path = _one_checkpoint(tmp_path)
    tensors = load_file(path / "rank-00000.safetensors")
    assert torch.equal(tensors["model.embed.weight"], torch.full((16, 8), 3.0))


def test_write_shard_streams_a_file_safetensors_reads_back_with_its_sha256(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from moestack.checkpoint import storage
    from moestack.checkpoint.storage import sha256_file, write_shard

    monkeypatch.setattr(storage, "WRITE_CHUNK", 1 << 20)  # "big" spans several write/hash calls

    tensors = {
        "f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(4, 6)[:, ::2], "big": torch.randn(3 << 20),  # 12 MiB
        "u16": torch.arange(5).to(torch.uint16),
    }
    rec = write_shard(tmp_path / "s.safetensors", tensors)
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert rec == {"bytes": (tmp_path / "s.safetensors").stat().st_size, "sha256": sha256_file(tmp_path / "s.safetensors")}


def test_a_large_share_is_split_into_files_written_in_parallel_and_loads_back(tmp_path, monkeypatch):
    from moestack.checkpoint import storage

    monkeypatch.setattr(storage, "FILE_BYTES", 600)  # this state is a few KiB: several files
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep=5))
    tensors, experts = make_state(3)
    mgr.save(3, tensors, experts, {"step": 3})
    mgr.wait()
    (_, path), = list_committed(tmp_path / "ckpt")
    names = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(names) > 2 and "rank-00000.safetensors" in names and "rank-00000-1.safetensors" in names
    assert verify(path) == []
    loaded, meta, _ = mgr.load()
    mgr.close()
    assert meta["step"] == 3 and set(loaded) == set(tensors)
    for key, t in tensors.items():
        assert torch.equal(loaded[key], t), key
    shard = path / "rank-00000-1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(path)
    assert len(problems) == 1 and str(shard) in problems[0]


def test_write_shard_names_a_dtype_it_cannot_store(tmp_path):
    import pytest

    from moestack.checkpoint import CheckpointError
    from moestack.checkpoint.storage import write_shard

    with pytest.raises(CheckpointError, match="'z'.*complex64"):
        write_shard(tmp_path / "s.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
