"""config_io: recipes are YAML diffs from the defaults; overrides are typed; unknown keys get a suggestion."""

from pathlib import Path

import pytest

from lmforge import config_io
from lmforge.errors import UserError
from lmforge.train.config import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.parent.name == "debug" for p in RECIPES) and len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path):
    cfg = config_io.load(TrainConfig, path)
    again = config_io.from_dict(TrainConfig, config_io.to_dict(cfg))
    assert again == cfg


def test_defaults_and_overrides_typed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1e-3\nmodel:\n  n_embd: 64\n  n_head: 2\n")
    cfg = config_io.load(
        TrainConfig,
        recipe,
        [
            "optim.betas=[0.9, 0.99]",
            "max_steps=7",
            "name=2024",
            "init_from=null",
            "compile=true",
            "optim.lr=3e-4",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4" is a string to PyYAML
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.max_steps == 7 and cfg.name == "2024" and cfg.init_from is None and cfg.compile is True
    # Untouched keys keep the parent's default; derived sizes follow the overridden ones.
    assert cfg.model.n_layer == TrainConfig().model.n_layer
    assert cfg.model.head_dim == 32 and cfg.model.intermediate_size == 256
    assert cfg.optim.min_lr == TrainConfig().optim.min_lr


def test_dump_holds_everything_and_reloads(tmp_path):
    cfg = config_io.load(TrainConfig, None, ["seq_len=64", "optim.warmup_steps=3"])
    path = tmp_path / "config.yaml"
    path.write_text(config_io.dump(cfg))
    assert config_io.load(TrainConfig, path) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["lr=1"], "did you mean 'optim.lr'?"),
        (["optim.lr=abc"], "optim.lr must be a float, got 'abc'"),
        (["max_steps=1.5"], "max_steps must be an integer, got '1.5'"),
        (["compile=maybe"], "compile must be true or false, got 'maybe'"),
        (["optim.betas=[1, 2, 3]"], "optim.betas must be a list of 2 floats"),
        (["optim=3"], "optim is a section"),
        (["max_steps"], "must look like key=value"),
        (["seq_len=512", "model.max_seq_len=256"], "seq_len 512 exceeds model.max_seq_len 256"),
    ],
)
def test_bad_overrides(overrides, needle):
    with pytest.raises(UserError) as e:
        config_io.load(TrainConfig, None, overrides)
    assert needle in str(e.value)


def test_bad_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lrate: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'optim.lrate'; did you mean 'optim.lr'"):
        config_io.load(TrainConfig, recipe)
    recipe.write_text("a: [1\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        config_io.load(TrainConfig, recipe)
    recipe.write_text("- 1\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        config_io.load(TrainConfig, recipe)
    with pytest.raises(UserError, match="not found"):
        config_io.load(TrainConfig, tmp_path / "missing.yaml")
