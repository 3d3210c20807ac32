"""Datasets: registry, seeded stratified splits, the three offline demo origins, and `prepare` end to end."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import data_raw
from lth.config import Params, params_from_dict
from lth.data import bio_textures, digits, fashion_mnist, splits, store
from lth.data.prepare import prepare_dataset
from lth.data.registry import REGISTRY, dataset_rows, get_origin, get_spec
from lth.errors import UserError

HAS_DEBIAN_FMNIST = fashion_mnist._has_files(fashion_mnist.DEBIAN_DIR)
needs_fmnist = pytest.mark.skipif(
    not HAS_DEBIAN_FMNIST, reason=f"{fashion_mnist.DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)"
)


def make_params(tmp_path: Path, datasets: dict, image_size: int = 16, seed: int = 0) -> Params:
    """A study whose data lives under tmp_path."""
    return params_from_dict(data_raw(tmp_path, datasets, image_size, seed), "test")


# ---------------------------------------------------------------- registry


def test_registry_declares_the_demo_datasets_with_importable_origins() -> None:
    assert get_spec("fashion-mnist").role == "source" and get_spec("fashion-mnist").num_classes == 10
    assert get_spec("digits").role == "target" and get_spec("digits").num_classes == 10
    assert get_spec("bio-textures").role == "target" and get_spec("bio-textures").num_classes >= 4
    for spec in REGISTRY.values():
        assert callable(get_origin(spec))


def test_unknown_dataset_is_a_user_error_listing_known_names() -> None:
    with pytest.raises(UserError, match=r"unknown dataset 'cifar-11' \(known: .*digits.*fashion-mnist"):
        get_spec("cifar-11")


def test_dataset_rows_report_prepared_state(tmp_path: Path) -> None:
    params = make_params(tmp_path, {"digits": {}})
    rows = {r["name"]: r for r in dataset_rows(params)}
    assert set(rows) == set(REGISTRY)
    assert rows["digits"]["prepared"] == "no" and rows["digits"]["in_study"]
    prepare_dataset("digits", params)
    assert {r["name"]: r for r in dataset_rows(params)}["digits"]["prepared"] == "yes"


# ---------------------------------------------------------------- split helpers


def test_stratified_split_keeps_proportions_and_is_seed_deterministic() -> None:
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])
    parts = splits.stratified_split(labels, [600, 200, 200], seed=3)
    assert [len(p) for p in parts] == [600, 200, 200]
    assert len(np.unique(np.concatenate(parts))) == 1000  # disjoint
    whole = splits.class_proportions(labels, 4)
    for part in parts:
        np.testing.assert_allclose(splits.class_proportions(labels[part], 4), whole, atol=0.006)
    again = splits.stratified_split(labels, [600, 200, 200], seed=3)
    other = splits.stratified_split(labels, [600, 200, 200], seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], other[0])


def test_subset_caps_size_and_keeps_everything_when_asked_for_more() -> None:
    labels = np.repeat(np.arange(3), 10)
    assert np.bincount(labels[splits.subset(labels, 9, seed=0)]).tolist() == [3, 3, 3]
    assert len(splits.subset(labels, 100, seed=0)) == 30
    assert len(splits.subset(labels, None, seed=0)) == 30


def test_resolve_sizes_rejects_more_than_available() -> None:
    assert splits.resolve_sizes("digits", 100, (0.6, 0.2, 0.2), (None, None, None)) == [60, 20, 20]
    assert splits.resolve_sizes("digits", 100, (0.6, 0.2, 0.2), (50, None, 10)) == [50, 20, 10]
    with pytest.raises(UserError, match="'digits'.*only 100 exist"):
        splits.resolve_sizes("digits", 100, (0.6, 0.2, 0.2), (90, 20, None))


# ---------------------------------------------------------------- origins


def test_digits_split_is_stratified_and_covers_all_images() -> None:
    from lth.config import DatasetParams

    raw = digits.load(DatasetParams(), seed=0, raw_dir=Path("unused"))
    sizes = {s: len(y) for s, (_, y) in raw.splits.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    all_labels = np.concatenate([y for _, y in raw.splits.values()])
    whole = splits.class_proportions(all_labels, 10)
    for images, labels in raw.splits.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8) and images.max() == 255
        np.testing.assert_allclose(splits.class_proportions(labels, 10), whole, atol=0.01)


def test_bio_texture_splits_use_disjoint_pixels_and_every_class() -> None:
    images = bio_textures.source_images()
    plan = bio_textures.plan(images, seed=0)
    patch = bio_textures.PATCH
    for name, per_split in plan.items():
        owner = np.full(images[name].shape[:2], -1)
        for k, split in enumerate(splits.SPLIT_NAMES):
            coords = per_split[split]
            assert len(coords) > 0, f"{name} has no {split} patches"
            for y, x in coords:
                window = owner[y : y + patch, x : x + patch]
                assert np.isin(window, (-1, k)).all(), f"{name}: a pixel at ({y},{x}) is in two splits"
                window[...] = k
    # balanced: each split has the same number of patches per class
    for split in splits.SPLIT_NAMES:
        assert len({len(p[split]) for p in plan.values()}) == 1


def test_bio_texture_retina_patches_skip_black_background() -> None:
    images = bio_textures.source_images()
    retina = images["retina"]
    for y, x in np.concatenate(list(bio_textures.plan(images, seed=0)["retina"].values())):
        assert (retina[y : y + bio_textures.PATCH, x : x + bio_textures.PATCH] < 20).mean() <= 0.1


def _write_idx(path: Path, header: bytes, body: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(header + body)


def test_idx_parser_reads_and_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    _write_idx(good, struct.pack(">HBBIII", 0, 8, 3, 2, 2, 3), bytes(range(12)))
    assert fashion_mnist.read_idx(good, 3).tolist() == np.arange(12).reshape(2, 2, 3).tolist()
    bad_magic = tmp_path / "bad-magic.gz"
    _write_idx(bad_magic, struct.pack(">HBBI", 0, 9, 1, 3), bytes(3))
    with pytest.raises(UserError, match="bad-magic.gz: bad IDX magic number"):
        fashion_mnist.read_idx(bad_magic, 1)
    short = tmp_path / "short.gz"
    _write_idx(short, struct.pack(">HBBIII", 0, 8, 3, 2, 2, 3), bytes(7))
    with pytest.raises(UserError, match="short.gz: truncated IDX data"):
        fashion_mnist.read_idx(short, 3)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(good.read_bytes()[:15])
    with pytest.raises(UserError, match="cut.gz: not a readable gzip file"):
        fashion_mnist.read_idx(cut_gzip, 3)


def test_fashion_mnist_user_path_without_files_is_a_user_error(tmp_path: Path) -> None:
    params = make_params(tmp_path, {"fashion-mnist": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(UserError, match="'fashion-mnist'.*lacks train-images"):
        prepare_dataset("fashion-mnist", params)


def test_fashion_mnist_offline_without_files_says_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist.*connect to the network"):
        prepare_dataset("fashion-mnist", make_params(tmp_path, {"fashion-mnist": {}}))
    assert not store.is_prepared(tmp_path / "data", "fashion-mnist")


@needs_fmnist
def test_fashion_mnist_from_debian_files_honours_subset_sizes(tmp_path: Path) -> None:
    params = make_params(tmp_path, {"fashion-mnist": {"train": 300, "val": 100, "test": 200}}, image_size=32)
    data = store.load_prepared(params.paths.data, prepare_dataset("fashion-mnist", params).name)
    assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10
    assert {s: len(data.splits[s]) for s in store.SPLITS} == {"train": 300, "val": 100, "test": 200}
    for split in data.splits.values():
        assert tuple(split.images.shape[1:]) == (3, 32, 32)
        assert np.bincount(split.labels.numpy(), minlength=10).min() == len(split) // 10  # stratified
        assert (split.images[:, 0] == split.images[:, 2]).all()  # grey copied into 3 channels
    assert data.meta["source_dir"] == str(fashion_mnist.DEBIAN_DIR)


# ---------------------------------------------------------------- prepare end to end


@pytest.mark.parametrize("name", ["digits", "bio-textures"])
def test_prepare_writes_a_reproducible_store(tmp_path: Path, name: str) -> None:
    sizes = {"train": 120, "val": 40, "test": 40}
    params = make_params(tmp_path / "a", {name: sizes})
    out = prepare_dataset(name, params)
    assert out == Path(params.paths.data) / "prepared" / name
    meta = json.loads((out / "meta.json").read_text())
    assert {s: meta["counts"][s]["total"] for s in store.SPLITS} == sizes
    assert meta["seed"] == 0 and meta["origin"] == get_spec(name).origin and meta["source_sha256"]
    assert all(min(meta["counts"][s]["per_class"]) > 0 for s in store.SPLITS)

    data = store.load_prepared(params.paths.data, name)
    assert data.num_classes == get_spec(name).num_classes
    assert tuple(data.train.images.shape) == (120, 3, 16, 16) and str(data.train.images.dtype) == "torch.uint8"
    assert meta["counts"]["train"]["per_class"] == np.bincount(data.train.labels.numpy()).tolist()

    again = prepare_dataset(name, make_params(tmp_path / "b", {name: sizes}))
    for npy in sorted(out.glob("*.npy")):
        assert npy.read_bytes() == (again / npy.name).read_bytes(), f"{npy.name} differs between runs"


def test_prepare_unlisted_dataset_uses_defaults(tmp_path: Path) -> None:
    params = make_params(tmp_path, {"fashion-mnist": {"train": 10}})
    meta = json.loads((prepare_dataset("bio-textures", params) / "meta.json").read_text())
    assert meta["requested"] == {"train": None, "val": None, "test": None, "path": None, "allow_fewer": False}
    assert meta["counts"]["train"]["total"] == meta["available"]["train"] == meta["sizes"]["train"]
    assert meta["geometry"] == "stretch" and meta["fewer_than_requested"] == {}
    assert set(meta["regions"]) == set(meta["class_names"])
