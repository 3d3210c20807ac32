"""The ten paper datasets: each origin from nothing on disk to data/prepared/ against local stand-ins.

CIFAR and Fashion-MNIST come from a 127.0.0.1 mirror serving the real archive formats through torchvision's own
downloader; folder imports and WikiArt subsets from tiny trees written here (Cytomine: test_datasets_cytomine.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fakes.archives import cifar_archive, fashion_mnist_files, make_tree, make_wikiart, md5
from fakes.http_files import FileServer
from fakes.study import last_line, lth, prepared
from helpers import free_port, write_params

from lth.data import fashion_mnist, store, wikiart
from lth.data.prepare import to_square_rgb
from lth.data.registry import REGISTRY
from lth.data.splits import group_split
from lth.errors import UserError

PAPER = {  # name: (classes, train/val/test or None)
    "cifar10": (10, None),
    "cifar100": (100, None),
    "fashion-mnist": (10, None),
    "human-lba": (9, (4051, 346, 1023)),
    "lung-tissues": (10, (4881, 562, 888)),
    "mouse-lba": (8, (1722, 716, 1846)),
    "bone-marrow": (8, (522, 130, 639)),
    "artist-1": (20, (3103, 389, 389)),
    "type": (20, (2868, 360, 360)),
    "artist-2": (19, (2827, 353, 353)),
}


# ---------------------------------------------------------------- registry


def test_registry_and_lth_datasets_list_the_ten_paper_datasets(tmp_path, monkeypatch, capsys) -> None:
    for name, (classes, splits) in PAPER.items():
        assert REGISTRY[name].num_classes == classes and REGISTRY[name].paper_splits == splits, name
    code, out, _ = lth(monkeypatch, capsys, "datasets", "--params", str(write_params(tmp_path, {"digits": {}})))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    for name, (classes, splits) in PAPER.items():
        assert rows[name][2] == str(classes)
        assert rows[name][3] == ("/".join(map(str, splits)) if splits else "-")


def test_group_split_keeps_each_slide_in_one_split_near_the_fractions() -> None:
    groups = np.repeat([f"slide{i}" for i in range(20)], np.arange(20) % 5 + 3)
    split = group_split(groups, (0.8, 0.1, 0.1), seed=0)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    assert set(split.tolist()) == {0, 1, 2} and abs((split == 0).mean() - 0.8) < 0.1
    assert np.array_equal(split, group_split(groups, (0.8, 0.1, 0.1), seed=0))


def test_variable_size_images_resize_like_arrays() -> None:
    rng = np.random.default_rng(0)
    same = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    assert np.array_equal(to_square_rgb(list(same), 16), to_square_rgb(same, 16))
    mixed = [rng.integers(0, 256, (h, 30, 3), dtype=np.uint8) for h in (10, 40)]
    assert to_square_rgb(mixed, 16).shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- torchvision sources


@pytest.fixture
def cifar_mirror(monkeypatch: pytest.MonkeyPatch):
    """CIFAR-10 and -100 served from 127.0.0.1, torchvision's URLs and md5s pointed at the tiny archives."""
    import torchvision.datasets as tvd

    files, server = {}, FileServer({})
    for kind, cls in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100)):
        archive, sums = cifar_archive(kind, train_per_class=30 if kind == "cifar10" else 4, test_per_class=3)
        server.files[f"/{cls.filename}"] = archive
        files[kind] = (cls, archive, sums)
    with server.running() as base:
        for cls, archive, sums in files.values():
            monkeypatch.setattr(cls, "url", f"{base}/{cls.filename}")
            monkeypatch.setattr(cls, "tgz_md5", md5(archive))
            monkeypatch.setattr(cls, "train_list", [[f, sums[f]] for f, _ in cls.train_list])
            monkeypatch.setattr(cls, "test_list", [[f, sums[f]] for f, _ in cls.test_list])
            monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": sums[cls.meta["filename"]]})
        yield server


@pytest.mark.parametrize("name,val", [("cifar10", 50), ("cifar100", 100)])
def test_cifar_downloads_verifies_and_prepares(tmp_path, monkeypatch, capsys, cifar_mirror, name, val) -> None:
    params = write_params(tmp_path, {name: {"val": val}})
    code, out, err = lth(monkeypatch, capsys, "prepare", name, "--params", str(params))
    assert code == 0, err
    data = prepared(tmp_path, name)
    n_classes = PAPER[name][0]
    per_class_train = 30 if name == "cifar10" else 4
    assert data.num_classes == n_classes and len(data.test) == 3 * n_classes
    assert len(data.train) + len(data.val) == per_class_train * n_classes and len(data.val) == val
    assert np.bincount(data.val.labels.numpy(), minlength=n_classes).min() == val // n_classes  # stratified
    raw = tmp_path / "data" / "raw" / name
    assert not list(raw.glob("*.tar.gz"))  # extracted members were md5-checked; the archive is not kept twice
    hits = sum(cifar_mirror.hits.values())
    assert lth(monkeypatch, capsys, "prepare", name, "--params", str(params))[0] == 0
    assert sum(cifar_mirror.hits.values()) == hits  # the verified copy in data/raw is reused


def test_cifar_checksum_mismatch_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, cifar_mirror) -> None:
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", "0" * 32)
    code, _, err = lth(
        monkeypatch, capsys, "prepare", "cifar10", "--params", str(write_params(tmp_path, {"cifar10": {"val": 50}}))
    )
    assert code == 2 and "checksum mismatch" in last_line(err)
    assert not (tmp_path / "data" / "raw" / "cifar10").exists()
    assert not store.is_prepared(tmp_path / "data", "cifar10")


def test_cifar_unreachable_mirror_is_a_user_error(tmp_path, monkeypatch, capsys) -> None:
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.CIFAR10, "url", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    code, _, err = lth(
        monkeypatch, capsys, "prepare", "cifar10", "--params", str(write_params(tmp_path, {"cifar10": {}}))
    )
    assert code == 2 and "'cifar10': download failed" in last_line(err)


def test_fashion_mnist_downloads_through_torchvision_when_debian_copy_is_absent(tmp_path, monkeypatch, capsys) -> None:
    import torchvision.datasets as tvd

    files = fashion_mnist_files(train_per_class=20, test_per_class=4)
    server = FileServer({f"/fmnist/{name}": data for name, data in files.items()})
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    params = write_params(tmp_path, {"fashion-mnist": {"val": 40}})
    with server.running() as base:
        monkeypatch.setattr(tvd.FashionMNIST, "mirrors", [f"{base}/fmnist/"])
        monkeypatch.setattr(tvd.FashionMNIST, "resources", [(n, "0" * 32) for n in files])
        code, _, err = lth(monkeypatch, capsys, "prepare", "fashion-mnist", "--params", str(params))
        assert code == 2 and "checksum mismatch" in err
        assert not (tmp_path / "data" / "raw" / "fashion-mnist").exists()
        monkeypatch.setattr(tvd.FashionMNIST, "resources", [(n, md5(d)) for n, d in files.items()])
        code, _, err = lth(monkeypatch, capsys, "prepare", "fashion-mnist", "--params", str(params))
    assert code == 0, err
    data = prepared(tmp_path, "fashion-mnist")
    assert (len(data.train), len(data.val), len(data.test)) == (160, 40, 40)
    assert data.meta["source_dir"].startswith(str(tmp_path / "data" / "raw" / "fashion-mnist"))


# ---------------------------------------------------------------- folder import


def test_folder_import_prepares_the_circulating_layout(tmp_path, monkeypatch, capsys) -> None:
    tree = make_tree(tmp_path / "human-lba")
    params = write_params(tmp_path, {"human-lba": {"path": str(tree)}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "human-lba", "--params", str(params))
    assert code == 0, err
    assert "your copy has 3 classes, the paper's has 9" in err
    data = prepared(tmp_path, "human-lba")
    assert data.class_names == ("human-lba_101", "human-lba_102", "human-lba_103")
    assert tuple(data.train.images.shape) == (12, 3, 16, 16) and data.meta["source_tree_sha256"]


@pytest.mark.parametrize(
    "damage,expected", [("one-class", "only one class"), ("truncated", "truncated or corrupt image")]
)
def test_folder_import_bad_inputs(tmp_path, monkeypatch, capsys, damage, expected) -> None:
    tree = make_tree(tmp_path / "tree", classes=1 if damage == "one-class" else 2)
    if damage == "truncated":
        victim = next((tree / "val").rglob("*.png"))
        victim.write_bytes(victim.read_bytes()[:60])
    params = write_params(tmp_path, {"bone-marrow": {"path": str(tree)}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "bone-marrow", "--params", str(params))
    assert code == 2 and expected in last_line(err)
    assert not store.is_prepared(tmp_path / "data", "bone-marrow")
    assert not list((tmp_path / "data").rglob(".bone-marrow.*"))  # no temporary folder left behind


# ---------------------------------------------------------------- WikiArt


def build_args(root: Path, meta: Path, out: Path, top: int, *extra: str) -> list[str]:
    return [
        "build",
        "wikiart",
        "--root",
        str(root),
        "--metadata",
        str(meta),
        "--label",
        "artist",
        "--top",
        str(top),
        "--seed",
        "0",
        "-o",
        str(out),
        *extra,
    ]


def test_wikiart_build_top_classes_stratified_and_reproducible(tmp_path, monkeypatch, capsys) -> None:
    root = tmp_path / "wikiart"
    meta = make_wikiart(root)
    first, again = tmp_path / "data" / "a1.csv", tmp_path / "data" / "again.csv"
    assert lth(monkeypatch, capsys, *build_args(root, meta, first, 3))[0] == 0
    assert lth(monkeypatch, capsys, *build_args(root, meta, again, 3))[0] == 0
    rows = wikiart.read_manifest(first)
    assert [r["path"] for r in rows] == [r["path"] for r in wikiart.read_manifest(again)]
    assert {r["label"] for r in rows} == {"monet", "degas", "renoir"}  # Unknown excluded; ties 10-10-10 by name
    split_counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert split_counts == {"train": 26, "val": 3, "test": 3}
    for label in ("monet", "degas", "renoir"):
        assert sum(r["split"] == "val" and r["label"] == label for r in rows) == 1

    # a second subset without the first one's images (Artist-2 vs Artist-1)
    second = tmp_path / "data" / "a2.csv"
    assert lth(monkeypatch, capsys, *build_args(root, meta, second, 2, "--exclude-manifest", str(first)))[0] == 0
    assert {r["label"] for r in wikiart.read_manifest(second)} == {"manet", "sisley"}

    params = write_params(tmp_path, {"artist-1": {"path": str(first)}})
    code, _, err = lth(monkeypatch, capsys, "prepare", "artist-1", "--params", str(params))
    assert code == 0 and "your copy has 3 classes, the paper's has 20" in err and "26/3/3" in err
    assert prepared(tmp_path, "artist-1").class_names == ("degas", "monet", "renoir")


def test_wikiart_artgan_csv_without_header_and_class_list(tmp_path) -> None:
    root = tmp_path / "wikiart"
    make_wikiart(root)
    artgan = tmp_path / "artist_train.csv"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    artgan.write_text("".join(f"{f},{0 if 'monet' in f else 1 if 'sisley' in f else 2}\n" for f in files))
    names = tmp_path / "artist_class.txt"
    names.write_text("0 Claude_Monet\n1 Alfred_Sisley\n2 Unknown\n")
    counts = wikiart.build(root, [artgan], "artist", 2, 0, tmp_path / "m.csv", classes=names)
    assert set(counts["train"]) == {"Claude_Monet", "Alfred_Sisley"}


def test_folder_import_at_224_px_is_stored_once_and_memory_mapped(tmp_path, monkeypatch, capsys) -> None:
    tree = make_tree(tmp_path / "tree", classes=2, per_class=3)
    params = write_params(tmp_path, {"bone-marrow": {"path": str(tree)}}, image_size=224)
    assert lth(monkeypatch, capsys, "prepare", "bone-marrow", "--params", str(params))[0] == 0
    folder = store.prepared_dir(tmp_path / "data", "bone-marrow")
    assert isinstance(np.load(folder / "train_images.npy", mmap_mode="r"), np.memmap)
    data = prepared(tmp_path, "bone-marrow")
    assert tuple(data.val.images.shape) == (6, 3, 224, 224) and str(data.val.images.dtype) == "torch.uint8"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("images", "labels")] + ["meta.json"]
    )


@pytest.mark.parametrize("damage,expected", [("edited", "checksum mismatch"), ("deleted", "which is not there")])
def test_wikiart_prepare_verifies_every_file(tmp_path, monkeypatch, capsys, damage, expected) -> None:
    root = tmp_path / "wikiart"
    manifest = tmp_path / "artist-2.csv"
    wikiart.build(root, [make_wikiart(root)], "artist", 3, 0, manifest)
    victim = manifest.parent / wikiart.read_manifest(manifest)[-1]["path"]
    victim.write_bytes(b"edited") if damage == "edited" else victim.unlink()
    code, _, err = lth(
        monkeypatch,
        capsys,
        "prepare",
        "artist-2",
        "--params",
        str(write_params(tmp_path, {"artist-2": {"path": str(manifest)}})),
    )
    assert code == 2 and expected in last_line(err)
    assert not store.is_prepared(tmp_path / "data", "artist-2")


def test_wikiart_metadata_naming_a_missing_image_is_a_user_error(tmp_path) -> None:
    root = tmp_path / "wikiart"
    meta = make_wikiart(root)
    next(root.rglob("monet_3.jpg")).unlink()
    with pytest.raises(UserError, match=r"line \d+ names .*monet_3.jpg, which is not under"):
        wikiart.build(root, [meta], "artist", 3, 0, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_pull_only_params_are_validated() -> None:
    from lth.config import ConfigError, params_from_dict

    raw = {"prepare": {"datasets": {"human-lba": {"crop_zoom": -1}}}}
    with pytest.raises(ConfigError, match="prepare.datasets.human-lba.crop_zoom: must be a zoom level"):
        params_from_dict(raw, "params.yaml")
