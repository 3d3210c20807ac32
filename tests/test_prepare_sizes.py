"""`lth prepare` holds WikiArt and Cytomine sets to the configured sizes, and makes images square as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from fakes.archives import make_tree, make_wikiart
from fakes.study import last_line, lth, prepared
from helpers import write_params

from lth.config import ConfigError, params_from_dict
from lth.data import store, wikiart
from lth.data.prepare import make_square, to_square_rgb


def params_with(tmp_path: Path, datasets: dict, **prepare) -> Path:
    """write_params plus extra `prepare:` keys (geometry)."""
    path = write_params(tmp_path, datasets)
    raw = yaml.safe_load(path.read_text())
    raw["prepare"].update(prepare)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def artist_manifest(tmp_path: Path) -> Path:
    """A 3-artist WikiArt manifest: 26/3/3 images (monet 12, degas 10, renoir 10; one of each in val and test)."""
    root = tmp_path / "wikiart"
    manifest = tmp_path / "artist-1.csv"
    wikiart.build(root, [make_wikiart(root)], "artist", 3, 0, manifest)
    return manifest


def test_wikiart_is_held_to_the_configured_sizes_stratified_and_seeded(tmp_path, monkeypatch, capsys,
                                                                      artist_manifest) -> None:
    sizes = {"train": 13, "val": 3, "test": 2}
    params = params_with(tmp_path, {"artist-1": {"path": str(artist_manifest), **sizes}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "artist-1", "--params", str(params))
    assert code == 0, err
    data = prepared(tmp_path, "artist-1")
    assert {s: len(data.splits[s]) for s in store.SPLITS} == sizes
    assert data.meta["sizes"] == sizes and data.meta["available"] == {"train": 26, "val": 3, "test": 3}
    # stratified: half of train (monet 10, degas 8, renoir 8) keeps each artist's share
    assert np.bincount(data.train.labels.numpy()).tolist() == [4, 5, 4]
    assert "13/3/2" in err  # the paper check compares what was prepared
    first = (store.prepared_dir(tmp_path / "data", "artist-1") / "train_images.npy").read_bytes()
    assert lth(monkeypatch, capsys, "prepare", "artist-1", "--params", str(params))[0] == 0
    assert (store.prepared_dir(tmp_path / "data", "artist-1") / "train_images.npy").read_bytes() == first


def test_a_set_too_small_for_its_sizes_fails_in_one_line_unless_told_to_keep_fewer(tmp_path, monkeypatch, capsys,
                                                                                   artist_manifest) -> None:
    asked = {"path": str(artist_manifest), "train": 20, "val": 5, "test": 3}
    params = params_with(tmp_path, {"artist-1": asked})
    code, _, err = lth(monkeypatch, capsys, "prepare", "artist-1", "--params", str(params))
    assert code == 2 and "the val split has 3 images, prepare.datasets.artist-1.val asks for 5" in last_line(err)
    assert "allow_fewer" in last_line(err) and not store.is_prepared(tmp_path / "data", "artist-1")

    params = params_with(tmp_path, {"artist-1": {**asked, "allow_fewer": True}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "artist-1", "--params", str(params))
    assert code == 0 and "kept 3 val images, fewer than the 5 asked" in err
    data = prepared(tmp_path, "artist-1")
    assert data.meta["sizes"] == {"train": 20, "val": 3, "test": 3}
    assert data.meta["fewer_than_requested"] == {"val": [3, 5]} and data.meta["requested"]["allow_fewer"] is True


def test_cytomine_sets_are_held_to_the_configured_sizes(tmp_path, monkeypatch, capsys) -> None:
    tree = make_tree(tmp_path / "human-lba", classes=3, per_class=4)  # 12 / 12 / 12, split by slide upstream
    params = params_with(tmp_path, {"human-lba": {"path": str(tree), "train": 9, "val": 6, "test": 3}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "human-lba", "--params", str(params))
    assert code == 0, err
    data = prepared(tmp_path, "human-lba")
    assert data.meta["sizes"] == {"train": 9, "val": 6, "test": 3}
    assert np.bincount(data.val.labels.numpy()).tolist() == [2, 2, 2]
    params = params_with(tmp_path, {"human-lba": {"path": str(tree), "train": 13}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "human-lba", "--params", str(params))
    assert code == 2 and "train split has 12 images, prepare.datasets.human-lba.train asks for 13" in last_line(err)


def test_geometry_makes_squares_by_stretching_padding_or_cropping() -> None:
    wide = np.zeros((1, 4, 8, 3), dtype=np.uint8)
    wide[0, :, :2] = 200  # a bright left edge, cut by a centre crop, kept (beside black bars) by padding
    assert make_square(wide, "stretch") is wide
    crop = make_square(wide, "center-crop")
    assert crop.shape == (1, 4, 4, 3) and crop.max() == 0
    pad = make_square(wide, "pad")
    assert pad.shape == (1, 8, 8, 3) and (pad[0, 2:6] == wide[0]).all() and pad[0, :2].max() == pad[0, 6:].max() == 0
    tall = np.full((1, 8, 4, 3), 255, dtype=np.uint8)
    assert make_square(tall, "pad")[0, :, :2].max() == 0 and make_square(tall, "center-crop").shape == (1, 4, 4, 3)
    out = {g: to_square_rgb(wide, 8, geometry=g)[0, 0] for g in ("stretch", "pad", "center-crop")}
    assert out["center-crop"].max() == 0 and out["pad"][0].max() == 0 and out["stretch"][0].max() > 0


def test_geometry_is_validated_and_recorded(tmp_path, monkeypatch, capsys, artist_manifest) -> None:
    with pytest.raises(ConfigError, match="prepare.geometry"):
        params_from_dict({"prepare": {"geometry": "squash"}}, "params.yaml")
    params = params_with(tmp_path, {"artist-1": {"path": str(artist_manifest)}}, geometry="pad")
    assert lth(monkeypatch, capsys, "prepare", "artist-1", "--params", str(params))[0] == 0
    data = prepared(tmp_path, "artist-1")
    assert data.meta["geometry"] == "pad" and "black borders" in data.meta["geometry_detail"]
    assert data.train.images[..., 0].max() == 0 < data.train.images[..., 8].min()  # 30x20 px: black side bars
