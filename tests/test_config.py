"""Config validation: every mistake names the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lth.config import ConfigError, Params, flatten, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_validate() -> None:
    demo = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "configs" / "paper.yaml")
    assert demo.model.arch == "resnet" and paper.model.arch == "resnet50"
    assert paper.imp.rounds == 31 and paper.imp.pruning_rate == 0.2 and paper.imp.rewind_epoch == 2
    assert len(paper.imp.seeds) == 4 and paper.train.batch_size == 64 and paper.train.patience == 5
    assert len(paper.transfer.targets) == 7


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"train": {"lrr": 0.1}}, "train.lrr", "unknown key"),
        ({"bogus": {}}, "bogus", "unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"train": {"batch_size": 1.5}}, "train.batch_size", "must be an integer"),
        ({"train": {"nesterov": "yes"}}, "train.nesterov", "true or false"),
        ({"imp": {"pruning_rate": 1.2}}, "imp.pruning_rate", "(0, 1)"),
        ({"imp": {"pruning_rate": 0}}, "imp.pruning_rate", "(0, 1)"),
        ({"imp": {"rewind_epoch": 9}, "train": {"max_epochs": 4}}, "imp.rewind_epoch", "max_epochs"),
        ({"model": {"arch": "vgg"}}, "model.arch", "one of"),
        ({"model": {"depth": 10}}, "model.depth", "6n+2"),
        ({"transfer": {"arms": ["scratch", "magic"]}}, "transfer.arms", "unknown arm"),
        ({"prepare": {"datasets": {"digits": {"train": 0}}}}, "prepare.datasets.digits.train", "positive"),
        ({"prepare": {"datasets": {"digits": {"colour": 1}}}}, "prepare.datasets.digits.colour", "unknown key"),
        ({"train": {"crop_size": 40}, "prepare": {"image_size": 32}}, "train.crop_size", "image_size"),
        ({"tune": {"lr_range": [0.1, 0.01]}}, "tune.lr_range", "low < high"),
        ({"imp": {"seeds": 3}}, "imp.seeds", "must be a list"),
        ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule", "one of"),
        ({"train": {"lr_schedule": "step"}}, "train.lr_anneal_epochs", "must list the epochs"),
        ({"train": {"lr_anneal_epochs": [5]}}, "train.lr_anneal_epochs", "only used by lr_schedule: step"),
        ({"train": {"lr_schedule": "step", "lr_anneal_epochs": [9, 4]}}, "train.lr_anneal_epochs", "increasing"),
        ({"train": {"lr_schedule": "step", "lr_anneal_epochs": [0]}}, "train.lr_anneal_epochs", ">= 1"),
        ({"train": {"lr_schedule": "step", "lr_anneal_epochs": [40], "max_epochs": 30}}, "train.lr_anneal_epochs",
         "below max_epochs"),
        ({"train": {"lr_schedule": "step", "lr_anneal_epochs": [5], "lr_anneal_factor": 1.5}},
         "train.lr_anneal_factor", "(0, 1)"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str, words: str) -> None:
    raw.setdefault("prepare", {}).setdefault("datasets", {"digits": {}})
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw, "p.yaml")
    message = str(err.value)
    assert message.startswith(f"p.yaml: {key}:"), message
    assert words in message
    assert "\n" not in message


def test_defaults_and_frozen() -> None:
    params = params_from_dict({"prepare": {"datasets": {"digits": {}}}})
    assert isinstance(params, Params)
    with pytest.raises(AttributeError):
        params.train.lr = 1.0  # type: ignore[misc]
    flat = flatten(params.train, "train")
    assert flat["train.lr"] == params.train.lr and flat["train.batch_size"] == 64
    # the schedule reaches MLflow under the params.yaml names (constant: today's behaviour, the default)
    assert flat["train.lr_schedule"] == "constant" and "train.lr_anneal_epochs" in flat
    step = params_from_dict({"prepare": {"datasets": {"digits": {}}},
                             "train": {"lr_schedule": "step", "lr_anneal_epochs": [3, 6], "lr_anneal_factor": 0.5}})
    flat = flatten(step.train, "train")
    assert (flat["train.lr_schedule"], flat["train.lr_anneal_factor"]) == ("step", 0.5)
    assert list(flat["train.lr_anneal_epochs"]) == [3, 6]


def test_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_scientific_notation_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"datasets": {"digits": {}}}}) + "train:\n  weight_decay: 1e-4\n")
    assert load_params(path).train.weight_decay == pytest.approx(1e-4)
