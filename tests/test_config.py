"""Config: YAML + key=value overrides with declared types and errors that name the fix."""

import pytest

from hncse_dist.config import ConfigError, load_config


def test_overrides_take_the_declared_types(tmp_path):
    cfg = load_config(None, ["learning_rate=3e-5", "hnm_alpha=null", "output_dir=2024", "max_steps=10",
                             "progress=false", "pm_w1=1"])
    assert cfg.learning_rate == 3e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.hnm_alpha is None and cfg.output_dir == "2024" and cfg.max_steps == 10
    assert cfg.progress is False and isinstance(cfg.pm_w1, float)


def test_yaml_values_are_typed_and_paths_resolve_next_to_the_file(tmp_path):
    (tmp_path / "data.txt").write_text("a\nb\n")
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1e-5\ntrain_file: data.txt\nbatch_size: 8\n")
    cfg = load_config(f)
    assert cfg.learning_rate == 1e-5 and cfg.batch_size == 8
    assert cfg.train_file == str(tmp_path / "data.txt")


@pytest.mark.parametrize("override, message", [
    ("max_steps=abc", "max_steps='abc' is not a valid int"),
    ("progress=maybe", "progress='maybe' is not a valid bool"),
    ("batch_sise=4", "did you mean 'batch_size'?"),
    ("max_steps", "is not key=value"),
])
def test_bad_overrides_name_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        load_config(None, [override])


def test_validation_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    with pytest.raises(ConfigError, match="pooler='max' does not exist"):
        load_config(None, [f"train_file={corpus}", "pooler=max"]).validate()
    with pytest.raises(ConfigError, match="no training data"):
        load_config(None, []).validate()
    with pytest.raises(ConfigError, match="pm_nonpositive"):
        load_config(None, [f"train_file={corpus}", "pm_nonpositive=drop"]).validate()


def test_help_config_is_a_yaml_config_of_the_defaults(tmp_path):
    from hncse_dist.config import CONFIG_KEYS, TrainConfig, config_template, load_config

    text = config_template()
    assert "# null: alpha ~ U(0, 1)" in text and "packed_forward: true" in text
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    loaded = load_config(path)
    defaults = TrainConfig()
    assert {k: getattr(loaded, k) for k in CONFIG_KEYS} == {k: getattr(defaults, k) for k in CONFIG_KEYS}
