from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from selfsup.config import load_config, save_config
from selfsup.errors import UsageError


@dataclass
class Optim:
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    epochs: int = 10
    dataset: str = "digits"
    amp: bool = False
    optim: Optim = field(default_factory=Optim)
    note: str | None = None
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    name: str = "run"
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\noptim:\n  lr: 0.01\n")
    cfg = load_config(Run, path, ["optim.lr=1e-3", "amp=true", "optim.betas=0.8,0.9"])
    assert cfg.epochs == 3 and cfg.optim.lr == pytest.approx(1e-3) and cfg.amp is True
    assert cfg.optim.betas == (0.8, 0.9) and cfg.dataset == "digits"


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(UsageError, match=r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"):
        load_config(Run, None, ["epoch=3"])
    with pytest.raises(UsageError, match=r"'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(Run, None, ["optim.lrr=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(UsageError, match="config key 'epochs' expects an integer"):
        load_config(Run, None, ["epochs=ten"])
    with pytest.raises(UsageError, match="config key 'amp' expects true or false"):
        load_config(Run, None, ["amp=3"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Run, None, ["epochs=7", "note=hello"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["epochs"] == 7
    assert load_config(Run, tmp_path / "config.yaml") == cfg


def test_missing_config_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "field_name", "expected"),
    [
        ("precision=no", "precision", "no"),  # YAML 1.1 would read a boolean False
        ("name=off", "name", "off"),
        ("name=yes", "name", "yes"),
        ("name=1e-3", "name", "1e-3"),  # a string field keeps the text
        ("name=007", "name", "007"),
        ("name=", "name", ""),
        ("amp=yes", "amp", True),
        ("amp=no", "amp", False),
        ("amp=False", "amp", False),
        ("amp=1", "amp", True),
        ("epochs=12", "epochs", 12),
        ("note=null", "note", None),
        ("note=no", "note", "no"),
        ("limit=~", "limit", None),
        ("limit=5", "limit", 5),
        ("extra.depth=4", "extra", {"depth": 4}),
    ],
)
def test_an_override_is_typed_by_the_field_it_sets(override, field_name, expected):
    assert getattr(load_config(Run, None, [override]), field_name) == expected


def test_numbers_and_lists_parse_by_their_field_types():
    cfg = load_config(Run, None, ["optim.lr=1e-3", "optim.betas=[0.8, 0.99]"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99)
    with pytest.raises(UsageError, match="expects 2 values"):
        load_config(Run, None, ["optim.betas=0.8"])
    with pytest.raises(UsageError, match="must be one of 'auto', 'no', 'bf16', 'fp16', got 'fp8'"):
        load_config(Run, None, ["precision=fp8"])
    with pytest.raises(UsageError, match="'optim' is a group of settings"):
        load_config(Run, None, ["optim=3"])


def test_a_yaml_boolean_for_a_string_field_says_to_quote_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("precision: no\n")
    with pytest.raises(UsageError, match="quote the value"):
        load_config(Run, path)


@pytest.mark.parametrize(
    ("yaml_text", "override"),
    [
        ("optim:\n  lr: 1e-3\n", "optim.lr=1e-3"),  # PyYAML reads 1e-3 (no dot) as a string
        ("optim:\n  lr: 5\n", "optim.lr=5"),
        ("optim:\n  betas: 0.8,0.99\n", "optim.betas=0.8,0.99"),
        ("optim:\n  betas: [0.8, 0.99]\n", "optim.betas=[0.8, 0.99]"),
        ("amp: 1\n", "amp=1"),
        ("amp: yes\n", "amp=yes"),
        ("note: none\n", "note=none"),
        ("note: hello\n", "note=hello"),
        ("limit: ~\n", "limit=~"),
        ("limit: 5\n", "limit=5"),
        ("precision: fp16\n", "precision=fp16"),
        ("name: '007'\n", "name=007"),
        ("extra:\n  depth: 4\n", "extra.depth=4"),
    ],
)
def test_a_value_means_the_same_in_yaml_and_on_the_command_line(tmp_path, yaml_text, override):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    assert load_config(Run, path) == load_config(Run, None, [override])


@pytest.mark.parametrize(
    ("yaml_text", "override", "message"),
    [
        ("amp: 3\n", "amp=3", "config key 'amp' expects true or false"),
        ("epochs: 2.5\n", "epochs=2.5", "config key 'epochs' expects an integer"),
        ("optim:\n  lr: fast\n", "optim.lr=fast", "config key 'optim.lr' expects a number"),
        ("precision: fp8\n", "precision=fp8", "config key 'precision' must be one of"),
        ("optim:\n  betas: [0.9]\n", "optim.betas=0.9", "config key 'optim.betas' expects 2 values"),
        ("optim: 3\n", "optim=3", "config key 'optim' is a group of settings"),
    ],
)
def test_a_value_is_refused_alike_in_yaml_and_on_the_command_line(tmp_path, yaml_text, override, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UsageError, match=message):
        load_config(Run, path)
    with pytest.raises(UsageError, match=message):
        load_config(Run, None, [override])
