"""The config system: typed dataclasses, YAML overrides, errors that name the key and the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from t2i_recap.config import ConfigError, from_dict, load_config, parse_override, save_config

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclasses.dataclass
class Root:
    name: str = "run"
    p: float = 0.0
    encoder: str | None = None
    mode: "str" = "a"
    optim: Optim = dataclasses.field(default_factory=Optim)
    tags: list[str] = dataclasses.field(default_factory=list)


def test_defaults_yaml_and_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(Root, f, ["optim.warmup_steps=10", "tags=[a, b]", "p=0.5"])
    assert cfg.name == "x" and cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 10
    assert cfg.tags == ["a", "b"] and cfg.p == 0.5 and cfg.optim.betas == (0.9, 0.999)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Root, f)
    assert "optim.lrr" in str(exc.value) and "bad.yaml" in str(exc.value)


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  warmup_steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.warmup_steps.*integer"):
        load_config(Root, f)
    with pytest.raises(ConfigError, match="p"):
        from_dict(Root, {"p": "high"}, "inline")
    with pytest.raises(ConfigError, match="--set"):
        load_config(Root, None, ["optim.lr"])


def test_post_init_checks_are_reported(tmp_path):
    f = tmp_path / "neg.yaml"
    f.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(Root, f)


def test_bool_is_not_int_and_int_is_float():
    with pytest.raises(ConfigError):
        from_dict(Optim, {"warmup_steps": True})
    assert from_dict(Optim, {"lr": 1}).lr == 1.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Root, None, ["optim.lr=0.002", "encoder=clip"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Root, tmp_path / "resolved.yaml")
    assert again == cfg


def test_parse_override_values():
    assert from_dict(Optim, parse_override("lr=1e-4")).lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert parse_override("flag=true") == {"flag": True}
    assert parse_override("name=") == {"name": ""}


def _all_yaml():
    return sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_loads(path):
    from t2i_recap.config_registry import config_class_for

    cls = config_class_for(path)
    cfg = load_config(cls, path)
    assert dataclasses.is_dataclass(cfg)


def test_yaml_bare_no_reads_as_the_literal_word():
    """`--set trainer.mixed_precision=no`: YAML 1.1 parses `no` as False; a Literal field that
    allows "no" takes the word, any other field keeps rejecting a bool."""
    from t2i_recap.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, ["trainer.mixed_precision=no"])
    assert cfg.trainer.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(TrainConfig, None, ["trainer.mixed_precision=yes"])  # True: no such word allowed


def test_shipped_recipe_by_name_and_by_path(tmp_path, monkeypatch):
    from t2i_recap.config_registry import resolve_config
    from t2i_recap.train_config import TrainConfig

    by_path = load_config(TrainConfig, REPO / "configs" / "train" / "recap_dit_b4_clip.yaml")
    monkeypatch.chdir(tmp_path)  # an empty folder: no configs/ beside it
    assert load_config(TrainConfig, "recap_dit_b4_clip") == by_path
    # the README's relative paths still name the shipped recipe from any folder
    assert load_config(TrainConfig, "configs/train/recap_dit_b4_clip.yaml") == by_path
    assert resolve_config("recap_dit_b4_clip").read_bytes() == (REPO / "configs/train/recap_dit_b4_clip.yaml").read_bytes()


def test_ambiguous_name_is_resolved_by_the_commands_kind_or_refused(tmp_path, monkeypatch):
    from t2i_recap.config_registry import RecipeError, resolve_config
    from t2i_recap.train_config import TrainConfig

    monkeypatch.chdir(tmp_path)
    assert resolve_config("shapes_tiny", "train").parent.name == "train"
    assert resolve_config("shapes_tiny", "caption").parent.name == "caption"
    assert load_config(TrainConfig, "shapes_tiny") == load_config(TrainConfig, REPO / "configs/train/shapes_tiny.yaml")
    with pytest.raises(RecipeError, match="ambiguous.*configs/train/shapes_tiny.yaml.*configs/caption/shapes_tiny.yaml"):
        resolve_config("shapes_tiny")


def test_unknown_name_lists_the_recipes(tmp_path, monkeypatch):
    from t2i_recap.train_config import TrainConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--config recap_dit_b4_clp: .*available: .*train/recap_dit_b4_clip"):
        load_config(TrainConfig, "recap_dit_b4_clp")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(TrainConfig, "configs/train/nope.yaml")


def test_an_existing_path_wins_over_a_recipe_name(tmp_path, monkeypatch):
    from t2i_recap.train_config import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recap_dit_b4_clip").write_text("trainer:\n  max_steps: 7\n")  # a file named like a recipe
    assert load_config(TrainConfig, "recap_dit_b4_clip").trainer.max_steps == 7
    local = tmp_path / "configs" / "train"
    local.mkdir(parents=True)
    (local / "recap_dit_b4_clip.yaml").write_text("trainer:\n  max_steps: 9\n")
    assert load_config(TrainConfig, "configs/train/recap_dit_b4_clip.yaml").trainer.max_steps == 9
