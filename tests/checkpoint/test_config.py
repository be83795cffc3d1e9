import pytest

from moestack.checkpoint import CheckpointConfig


def test_defaults_are_valid_and_off():
    cfg = CheckpointConfig().validate()
    assert cfg.every == 0 and cfg.keep == 2 and cfg.pec_k == 0 and cfg.async_save


@pytest.mark.parametrize("field, value", [
    ("every", -1), ("keep", 0), ("pec_k", -2), ("pec_policy", "random"), ("when_busy", "drop"),
    ("async_save", "yes"), ("plt_threshold", 1.5), ("plt_threshold", -0.1), ("commit_timeout_s", 0),
    ("every", 2.5), ("keep", True),
])
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"checkpoint.{field}"):
        CheckpointConfig(**{field: value}).validate()


def test_from_dict_rejects_unknown_keys():
    assert CheckpointConfig.from_dict({"every": 5, "pec_k": 2}).pec_k == 2
    with pytest.raises(ValueError, match="pec_kk"):
        CheckpointConfig.from_dict({"pec_kk": 2})
