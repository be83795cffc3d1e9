"""Placement JSON format: round trip, queries, and one clear error per malformed file."""

import json

import pytest

from moestack.placement import FORMAT, Placement, PlacementError


def write(tmp_path, doc, name="placement.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def doc(rows, num_gpus=2, **extra):
    return {"format": FORMAT, "num_gpus": num_gpus, "expert_to_gpu": rows, **extra}


def test_json_round_trip_keeps_every_field(tmp_path):
    placement = Placement(2, [[0, 1, 1, 0], [1, 1, 0, 0]])
    placement.save(tmp_path / "p.json")
    loaded = Placement.load(tmp_path / "p.json")
    assert loaded == placement
    raw = json.loads((tmp_path / "p.json").read_text())
    assert raw == {"format": "moestack.placement/v1", "num_gpus": 2, "expert_to_gpu": [[0, 1, 1, 0], [1, 1, 0, 0]]}


def test_contiguous_puts_blocks_of_experts_on_each_gpu():
    placement = Placement.contiguous(num_layers=2, num_experts=8, num_gpus=4)
    assert placement.expert_to_gpu == [[0, 0, 1, 1, 2, 2, 3, 3]] * 2
    assert (placement.num_layers, placement.num_experts) == (2, 8)


def test_slots_are_ascending_global_ids_per_gpu():
    placement = Placement(2, [[1, 0, 1, 0, 0, 1]])
    assert placement.experts_on(0, 0) == [1, 3, 4]
    assert placement.local_to_global(0, 1) == [0, 2, 5]
    assert placement.slot_of(0, 4) == (0, 2)
    assert placement.slot_of(0, 5) == (1, 2)
    for expert in range(6):
        gpu, slot = placement.slot_of(0, expert)
        assert placement.local_to_global(0, gpu)[slot] == expert


def test_wrong_format_string_is_named(tmp_path):
    path = write(tmp_path, {**doc([[0, 1]]), "format": "moestack.placement/v0"})
    with pytest.raises(PlacementError, match=r"placement.json: field 'format' is 'moestack.placement/v0' but must be 'moestack.placement/v1'"):
        Placement.load(path)


def test_gpu_out_of_range_names_layer_and_expert(tmp_path):
    path = write(tmp_path, doc([[0, 1], [0, 2]]))
    with pytest.raises(PlacementError, match=r"layer 1 expert 1 is on gpu 2 but gpus are 0\.\.1"):
        Placement.load(path)


def test_uneven_counts_name_layer_gpu_and_allowed_count(tmp_path):
    rows = [[0, 0, 0, 0, 1, 1, 1, 1]] * 3 + [[0, 1, 1, 1, 1, 1, 0, 0]]
    path = write(tmp_path, doc(rows))
    with pytest.raises(PlacementError) as err:
        Placement.load(path)
    message = str(err.value)
    assert "placement.json: layer 3 puts 3 experts on gpu 0 but each gpu must hold 4 (E=8, G=2)" in message
    assert "allow_uneven" in message


def test_allow_uneven_accepts_unequal_counts(tmp_path):
    path = write(tmp_path, doc([[0, 1, 1]], allow_uneven=True))
    placement = Placement.load(path)
    assert placement.allow_uneven and placement.experts_on(0, 1) == [1, 2]


def test_experts_not_divisible_by_gpus_is_clear(tmp_path):
    path = write(tmp_path, doc([[0, 1, 2, 0, 1]], num_gpus=3))
    with pytest.raises(PlacementError, match=r"E=5 experts cannot be split evenly over G=3 gpus"):
        Placement.load(path)
    with pytest.raises(PlacementError, match=r"E=6 experts cannot be split evenly over G=4"):
        Placement.contiguous(2, 6, 4)


def test_layer_count_mismatch_with_model(tmp_path):
    path = write(tmp_path, doc([[0, 1], [1, 0]]))
    placement = Placement.load(path)
    with pytest.raises(PlacementError, match=r"placement.json: field 'expert_to_gpu' has 2 MoE layers but the model has 4"):
        placement.validate(num_layers=4)
    with pytest.raises(PlacementError, match=r"has 2 experts per layer but the model has 8"):
        placement.validate(num_experts=8)
    with pytest.raises(PlacementError, match=r"'num_gpus' is 2 but the run has 4"):
        placement.validate(num_gpus=4)


@pytest.mark.parametrize(
    "document, needle",
    [
        ({"format": FORMAT, "num_gpus": 2}, "missing field 'expert_to_gpu'"),
        (doc([[0, 1.5]]), "layer 0 expert 1 has gpu 1.5; gpus must be integers"),
        (doc([[0, True]]), "gpus must be integers"),
        (doc([[0, 1]], num_gpus="2"), "field 'num_gpus' must be a positive integer"),
        (doc([[0, 1]], num_gpus=0), "field 'num_gpus' must be a positive integer"),
        (doc([[0, 1], [0, 1, 1, 0]]), "layer 1 lists 4 experts but layer 0 lists 2"),
        (doc([]), "must be a non-empty list of lists"),
        ({**doc([[0, 1]]), "expert_to_gpus": []}, "unknown field 'expert_to_gpus'"),
        ([1, 2], "top level must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_files_get_one_clear_error(tmp_path, document, needle):
    path = write(tmp_path, document)
    with pytest.raises(PlacementError) as err:
        Placement.load(path)
    assert needle in str(err.value)
    assert str(err.value).startswith(str(path))


def test_missing_file_is_a_placement_error(tmp_path):
    with pytest.raises(PlacementError, match="file not found"):
        Placement.load(tmp_path / "nope.json")
