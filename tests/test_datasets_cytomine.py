"""`lth pull cytomine` through the real cytomine-python-client against a fake Cytomine API on 127.0.0.1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fakes.cytomine_api import PRIVATE, PUBLIC, FakeCytomine
from fakes.study import last_line, lth, prepared
from helpers import free_port, write_params


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYTOMINE_PUBLIC_KEY", PUBLIC)
    monkeypatch.setenv("CYTOMINE_PRIVATE_KEY", PRIVATE)


def pull_args(host: str, params: Path, project: str = "ulb_anapath_lba") -> list[str]:
    return ["pull", "cytomine", "--host", host, "--project", project, "--dataset", "human-lba", "--params", str(params)]


def test_cytomine_pull_splits_by_slide_then_prepares_with_paper_warning(tmp_path, monkeypatch, capsys, keys) -> None:
    fake = FakeCytomine()
    # configs/paper.yaml's form: path names the pull's own folder
    raw_path = str(tmp_path / "data" / "raw" / "human-lba")
    params = write_params(tmp_path, {"human-lba": {"crop_zoom": 1, "crop_max_size": 64, "path": raw_path}})
    with fake.running() as host:
        code, out, err = lth(monkeypatch, capsys, *pull_args(host, params))
    assert code == 0, err
    raw = tmp_path / "data" / "raw" / "human-lba"
    with (raw / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 36 and {r["label"] for r in rows} == set(fake.terms.values())
    slide_split = {}
    for row in rows:
        assert slide_split.setdefault(row["image"], row["split"]) == row["split"], "a slide spans two splits"
    assert set(slide_split.values()) == {"train", "val", "test"}
    assert all(q.get("zoom") == ["1"] and q.get("maxSize") == ["64"] for q in fake.crop_params)
    # the term filter drops the unlabelled annotation server-side; the two-term one is skipped here
    assert json.loads((raw / "pull.json").read_text())["skipped_annotations"] == 1

    code, _, err = lth(monkeypatch, capsys, "prepare", "human-lba", "--params", str(params))
    assert code == 0, err
    assert "your copy has 3 classes, the paper's has 9" in err and "the paper's are 4051/346/1023" in err
    data = prepared(tmp_path, "human-lba")
    assert (
        data.class_names == tuple(sorted(fake.terms.values()))
        and len(data.train) + len(data.val) + len(data.test) == 36
    )
    assert data.meta["files_verified"] == 36 and len(data.meta["paper_mismatches"]) == 2


def test_cytomine_pull_resumes_and_is_never_taken_for_finished(tmp_path, monkeypatch, capsys, keys) -> None:
    fake = FakeCytomine(failing={9203})
    params = write_params(tmp_path, {"human-lba": {}})
    raw = tmp_path / "data" / "raw" / "human-lba"
    with fake.running() as host:
        code, _, err = lth(monkeypatch, capsys, *pull_args(host, params, project="42"))
        assert code == 2 and "annotation 9203" in err and "run the same pull again" in err
        assert not (raw / "manifest.csv").exists() and not list(raw.rglob(".*.partial.png"))
        code, _, err = lth(monkeypatch, capsys, "prepare", "human-lba", "--params", str(params))
        assert code == 2 and "unfinished" in err
        fake.failing.clear()
        assert lth(monkeypatch, capsys, *pull_args(host, params, project="42"))[0] == 0
    assert (raw / "manifest.csv").is_file()
    assert lth(monkeypatch, capsys, "prepare", "human-lba", "--params", str(params))[0] == 0
    # crops dumped by the first run are skipped by the second; only the failed one is asked for twice
    assert fake.crop_hits[9203] == 2 and set(fake.crop_hits.values()) == {1, 2} and len(fake.crop_hits) == 36


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no-keys", "CYTOMINE_PUBLIC_KEY and CYTOMINE_PRIVATE_KEY"),
        ("wrong-keys", "rejected the keys"),
        ("unreachable", "unreachable"),
        ("no-terms", "has no terms"),
        ("unknown-project", "project 'nope' not found"),
        ("corrupt-crop", "annotation 9102 (image 501) is truncated or corrupt"),
    ],
)
def test_cytomine_bad_inputs_end_in_one_line_and_no_manifest(
    tmp_path, monkeypatch, capsys, keys, case, expected
) -> None:
    fake = FakeCytomine(terms={} if case == "no-terms" else FakeCytomine().terms, corrupt={9102})
    if case == "no-keys":
        monkeypatch.delenv("CYTOMINE_PRIVATE_KEY")
        monkeypatch.delenv("CYTOMINE_PUBLIC_KEY")
    if case == "wrong-keys":
        monkeypatch.setenv("CYTOMINE_PRIVATE_KEY", "not-the-key")
    params = write_params(tmp_path, {"human-lba": {}})
    with fake.running() as host:
        host = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else host
        code, _, err = lth(monkeypatch, capsys, *pull_args(host, params, "nope" if case == "unknown-project" else "42"))
    assert code == 2 and expected in last_line(err), err
    raw = tmp_path / "data" / "raw" / "human-lba"
    assert not (raw / "manifest.csv").exists() and not list(raw.rglob(".*.partial.png"))
