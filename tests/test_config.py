import pytest

from moestack.config import Config, ConfigError, load_config, to_toml


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_validate_and_round_trip_through_toml(tmp_path):
    cfg = load_config(overrides={"moe.top_k": "1", "model.arch": "scmoe", "train.lr": 1})
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg and cfg.moe.top_k == 1 and cfg.train.lr == 1.0


def test_cli_overrides_beat_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nsteps = 5\nseed = 3\n"), {"train.steps": "7"})
    assert (cfg.train.steps, cfg.train.seed) == (7, 3)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[model]\nd_modell = 3\n", "unknown config key 'model.d_modell'"),
        ("[modle]\nd_model = 3\n", "unknown config section 'modle'"),
        ("[moe]\ntop_k = 'two'\n", "moe.top_k expects int"),
        ("[moe]\ntop_k = 9\nnum_experts = 8\n", "moe.top_k=9 exceeds moe.num_experts=8"),
        ("[model]\nd_model = 100\nn_heads = 3\n", "model.n_heads=3 does not divide model.d_model=100"),
        ("[model]\narch = 'top3'\n", "model.arch='top3' is not one of top2, shared_top1, scmoe"),
        ("[parallel]\nep = 3\n", "parallel.ep=3 does not divide moe.num_experts=8"),
        ("[checkpoint]\npec_policy = 'random'\n", "checkpoint.pec_policy"),
        ("[train\nsteps=1", "not valid TOML"),
        ("steps = 1\n", "must be a [section]"),
        ("[train]\nsteps = \"20\"\n", "train.steps expects int, got the string '20'; write it without quotes"),
        ("[moe]\nrenormalize = \"no\"\n", "moe.renormalize expects bool, got the string 'no'"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_bool_override_parses_words():
    assert load_config(overrides={"model.tie_embeddings": "false"}).model.tie_embeddings is False
    with pytest.raises(ConfigError, match="expects true or false"):
        load_config(overrides={"model.tie_embeddings": "maybe"})


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().model.d_model = 3


def test_fields_with_short_flags_take_their_dotted_spelling_too():
    from moestack.cli import build_parser, overrides_from

    for argv, want in ((["--train.steps", "3"], {"train.steps": "3"}), (["--steps", "3"], {"train.steps": "3"}),
                       (["--ckpt.every", "5", "--train.run-dir", "x"], {"checkpoint.every": "5", "train.run_dir": "x"})):
        assert overrides_from(build_parser().parse_args(["train", *argv])) == want
