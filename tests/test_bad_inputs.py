"""Bad inputs, one table: each case runs the real CLI entry point (lth.cli.main) on a tiny study with one thing
wrong, and must end with exit status 2, exactly one `lth: error:` line on stderr naming what is wrong and where,
no traceback, and no new or changed file left behind."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helpers import free_port, lth_env, run_lth, tiny_raw, write_cli_study
from lth.cli import main
from lth.config import params_from_dict
from lth.fsutil import sha256_file
from lth.study.imp import make_job, run_imp

SEED0 = Path("models/tickets/fashion-mnist/seed0")
PREP = Path("data/prepared/fashion-mnist")
IMP = ["imp", "fashion-mnist", "--seed", "0", "--params", "tiny.yaml"]
TRANSFER = ["transfer", "digits", "--arm", "transfer", "--params", "tiny.yaml"]
FETCH = ["tickets", "fetch", "--source", "fashion-mnist", "--sparsity", "0.2", "-o", "fetched", "--params", "tiny.yaml"]
FOLDER_PREP = ["prepare", "human-lba", "--params", "tiny.yaml"]


# ---------------------------------------------------------------- ways to break a study


def params(**sections) -> Callable[[Path], None]:
    """Rewrite tiny.yaml with these sections merged in (a value of None deletes the key)."""
    def apply(root: Path) -> None:
        raw = yaml.safe_load((root / "tiny.yaml").read_text())
        for section, values in sections.items():
            raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
        (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return apply


def text(rel: str, content: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text(content)


def delete(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def flip_byte(rel: str, offset: int = -10) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        data = bytearray((root / rel).read_bytes())
        data[offset] ^= 0xFF
        (root / rel).write_bytes(bytes(data))
    return apply


def prepared_array(fname: str, make: Callable[[np.ndarray], np.ndarray | bytes]) -> Callable[[Path], None]:
    """Replace a prepared array and record its new checksum, as a buggy prepare step would."""
    def apply(root: Path) -> None:
        path = root / PREP / fname
        new = make(np.load(path, allow_pickle=False))
        if isinstance(new, bytes):
            path.write_bytes(new)
        else:
            np.save(path, new, allow_pickle=False)
        meta = json.loads((root / PREP / "meta.json").read_text())
        meta["sha256"][fname] = sha256_file(path)
        (root / PREP / "meta.json").write_text(json.dumps(meta))
    return apply


def ticket_file(round_: int, fname: str, make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace a ticket file and record its new checksum in ticket.json (a consistent but broken ticket)."""
    def apply(root: Path) -> None:
        d = root / SEED0 / f"round{round_:02d}"
        (d / fname).write_bytes(make((d / fname).read_bytes()))
        meta = json.loads((d / "ticket.json").read_text())
        meta["sha256"][fname] = sha256_file(d / fname)
        (d / "ticket.json").write_text(json.dumps(meta))
    return apply


def wrong_shape_mask(data: bytes) -> bytes:
    mask = st_load(data)
    name = sorted(mask)[0]
    mask[name] = torch.ones(mask[name].numel() + 1, dtype=torch.bool)
    return st_save(mask)


def drop_checksums(root: Path) -> None:
    path = root / SEED0 / "round01" / "ticket.json"
    meta = json.loads(path.read_text())
    del meta["sha256"]["weights.safetensors"]
    path.write_text(json.dumps(meta))


def image_folder(broken: str = "") -> Callable[[Path], None]:
    """A split/class/image tree for human-lba (two classes), with one thing `broken`."""
    def apply(root: Path) -> None:
        tree = root / "lba"
        classes = ["cell-a"] if broken == "one-class" else ["cell-a", "cell-b"]
        for split in ("train", "val", "test"):
            for i, cls in enumerate(classes):
                (tree / split / cls).mkdir(parents=True)
                if broken == "empty-class" and split == "val":
                    continue  # class folders without any image
                for k in range(2):
                    pixels = np.full((8, 8, 3), 40 * i + k, dtype=np.uint8)
                    Image.fromarray(pixels).save(tree / split / cls / f"{k}.png")
        if broken == "corrupt-image":
            good = tree / "train" / "cell-b" / "1.png"
            good.write_bytes(good.read_bytes()[:30])  # truncated mid-header
        params(prepare={"datasets": {"human-lba": {"path": str(tree)}}})(root)
    return apply


def untrained_round(round_: int) -> Callable[[Path], None]:
    """Tamper round-1 trained weights and remove round 2, so a rerun of `lth imp` must read them."""
    def apply(root: Path) -> None:
        shutil.rmtree(root / SEED0 / f"round{round_ + 1:02d}")
        flip_byte(str(SEED0 / f"round{round_:02d}" / "trained.safetensors"))(root)
    return apply


def moto_no_bucket(root: Path) -> None:
    params(tracking={"artifact_location": "s3://lth-no-such-bucket/mlflow"})(root)


@dataclass(frozen=True)
class Case:
    """One bad input: how to break the study, the command, what the message must name."""

    id: str
    args: list[str]
    names: str  # a substring the one-line message must contain (the key, file or value at fault)
    setup: Callable[[Path], None] = lambda root: None
    env: dict[str, str] = field(default_factory=dict)
    moto: bool = False


PORT = free_port()
NO_AWS = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true"}
FAKE_AWS = {**NO_AWS, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}

CASES = [
    # params files
    Case("params-missing-file", ["imp", "fashion-mnist", "--params", "nope.yaml"], "nope.yaml"),
    Case("params-bad-yaml", IMP, "tiny.yaml: line 3", text("tiny.yaml", "train:\n  lr: [0.1\nimp: {}\n")),
    Case("params-not-a-mapping", IMP, "YAML mapping", text("tiny.yaml", "- train\n- imp\n")),
    Case("params-unknown-section", IMP, "trian", params(trian={"lr": 0.1})),
    Case("params-unknown-key", IMP, "train.learning_rate", params(train={"learning_rate": 0.1})),
    Case("params-wrong-type-float", IMP, "train.lr", params(train={"lr": "fast"})),
    Case("params-wrong-type-int", IMP, "imp.rounds", params(imp={"rounds": "three"})),
    Case("params-wrong-type-bool", IMP, "tracking.register", params(tracking={"register": 3})),
    Case("params-wrong-type-list", IMP, "imp.seeds", params(imp={"seeds": 0})),
    Case("params-out-of-range-rate", IMP, "imp.pruning_rate", params(imp={"pruning_rate": 1.5})),
    Case("params-out-of-range-depth", IMP, "model.depth", params(model={"depth": 9})),
    Case("params-unknown-arch", IMP, "model.arch", params(model={"arch": "vgg"})),
    Case("params-unknown-arm", TRANSFER, "magic", params(transfer={"arms": ["scratch", "magic"]})),
    Case("params-crop-exceeds-image", IMP, "train.crop_size", params(train={"crop_size": 16})),
    Case("params-is-a-directory", ["imp", "fashion-mnist", "--params", "data"], "data"),
    # CLI arguments
    Case("cli-unknown-dataset", ["imp", "imagenet", "--params", "tiny.yaml"], "imagenet"),
    Case("cli-unknown-target", ["transfer", "imagenet", "--params", "tiny.yaml"], "imagenet"),
    Case("cli-unknown-arm", ["transfer", "digits", "--arm", "magic", "--params", "tiny.yaml"], "magic"),
    Case("cli-seed-not-an-int", ["imp", "fashion-mnist", "--seed", "abc", "--params", "tiny.yaml"], "abc"),
    Case("cli-rounds-zero", ["imp", "fashion-mnist", "--rounds", "0", "--params", "tiny.yaml"], "--rounds"),
    Case("cli-unknown-command", ["frobnicate"], "frobnicate"),
    Case("cli-missing-argument", ["imp", "--params", "tiny.yaml"], "SOURCE"),
    Case("cli-unprepared-dataset", ["imp", "cifar10", "--params", "tiny.yaml"], "cifar10"),
    Case("cli-prepare-nothing", ["prepare", "--params", "tiny.yaml"], "name a dataset"),
    # dataset files
    Case("data-checksum-mismatch", IMP, "train_images.npy", flip_byte(str(PREP / "train_images.npy"))),
    Case("data-missing-split-file", IMP, "val_labels.npy", delete(str(PREP / "val_labels.npy"))),
    Case("data-corrupt-meta", IMP, "meta.json", text(str(PREP / "meta.json"), "{\"name\": ")),
    Case("data-corrupt-npy", IMP, "test_labels.npy", prepared_array("test_labels.npy", lambda a: b"\x93NUMPY garbage")),
    Case("data-wrong-channels", IMP, "train_images.npy", prepared_array("train_images.npy", lambda a: a[:, :1])),
    Case("data-labels-out-of-range", IMP, "val_images.npy", prepared_array("val_labels.npy", lambda a: a + 7)),
    Case("data-folder-missing", FOLDER_PREP, "no-such-folder",
         params(prepare={"datasets": {"human-lba": {"path": "no-such-folder"}}})),
    Case("data-corrupt-image", FOLDER_PREP, "1.png", image_folder("corrupt-image")),
    Case("data-one-class-folder", FOLDER_PREP, "cell-a", image_folder("one-class")),
    Case("data-empty-classes", FOLDER_PREP, "val", image_folder("empty-class")),
    # ticket files
    Case("ticket-tampered-bytes", TRANSFER, "round01/weights.safetensors", flip_byte(str(SEED0 / "round01/weights.safetensors"))),
    Case("ticket-truncated-safetensors", TRANSFER, "mask.safetensors", ticket_file(0, "mask.safetensors", lambda b: b[:50])),
    Case("ticket-mask-weight-shape", TRANSFER, "disagree", ticket_file(1, "mask.safetensors", wrong_shape_mask)),
    Case("ticket-arch-mismatch", TRANSFER, "resnet8w4", params(model={"width": 8})),
    Case("ticket-missing-json", TRANSFER, "round02", delete(str(SEED0 / "round02/ticket.json"))),
    Case("ticket-corrupt-json", TRANSFER, "round02/ticket.json", text(str(SEED0 / "round02/ticket.json"), "{")),
    Case("ticket-without-checksum", TRANSFER, "weights.safetensors", drop_checksums),
    Case("ticket-tampered-on-resume", IMP, "round01/trained.safetensors", untrained_round(1)),
    # registry and tracking
    Case("registry-unknown-source", ["tickets", "fetch", "--source", "imagenet", "--sparsity", "0.2", "-o", "fetched",
                                     "--params", "tiny.yaml"], "imagenet"),
    Case("registry-no-near-sparsity", FETCH[:5] + ["0.9"] + FETCH[6:], "0.9000"),
    Case("registry-unknown-arch", FETCH + ["--arch", "resnet99"], "resnet99"),
    Case("registry-unknown-seed", FETCH + ["--seed", "7"], "seed 7"),
    Case("registry-output-not-a-ticket-dir", FETCH[:7] + ["data"] + FETCH[8:], "data"),
    Case("tracking-server-down-imp", IMP, f"127.0.0.1:{PORT}", params(tracking={"uri": None}),
         env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORT}"}),
    Case("tracking-server-down-tickets", ["tickets", "list", "--params", "tiny.yaml"], f"127.0.0.1:{PORT}",
         params(tracking={"uri": f"http://user:pw@127.0.0.1:{PORT}"})),
    # S3
    Case("s3-no-credentials", IMP, "s3://lth-bucket/mlflow",
         params(tracking={"artifact_location": "s3://lth-bucket/mlflow"}), env=NO_AWS),
    Case("s3-endpoint-down", IMP, f"127.0.0.1:{PORT}", params(tracking={"artifact_location": "s3://lth-bucket/mlflow"}),
         env={**FAKE_AWS, "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{PORT}"}),
    Case("s3-no-bucket", IMP, "s3://lth-no-such-bucket/mlflow", moto_no_bucket, env=FAKE_AWS, moto=True),
]


# ---------------------------------------------------------------- the study every case starts from


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny study with two IMP rounds of tickets and an MLflow store holding three registered ticket versions."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("template")
    write_cli_study(root)
    study = params_from_dict(tiny_raw(root))
    run_imp(make_job("fashion-mnist", 0, study), study)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    name = f"ticket-fashion-mnist-{study.model.name}"
    client.create_registered_model(name)
    for round_, sparsity in enumerate((0.0, 0.2, 0.36)):
        client.create_model_version(name, source="file:///nowhere", tags={
            "source": "fashion-mnist", "arch": study.model.name, "seed": "0", "round": str(round_),
            "sparsity": f"{sparsity:.4f}", "rewind_epoch": "1"})
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file but the MLflow database: path -> (size, mtime)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not p.name.startswith("mlflow.db")}


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> tuple[int, str, str]:
    """lth.cli.main() with ARGS, as the console script runs it; (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lth", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capfd.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
        case: Case, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture) -> None:
    root = tmp_path / "study"
    shutil.copytree(template, root)
    params(paths={k: str(root / k) for k in ("data", "models", "results", "reports")},
           tracking={"uri": f"sqlite:///{root / 'mlflow.db'}"})(root)
    case.setup(root)
    for key in [k for k in list(__import__("os").environ) if k.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(key)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    before = snapshot(root)
    if case.moto:
        from moto import mock_aws

        with mock_aws():
            status, out, err = run_main(case.args, monkeypatch, capfd)
    else:
        status, out, err = run_main(case.args, monkeypatch, capfd)
    assert status == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("lth: error: ") and "Traceback" not in err, err
    assert case.names in err, err
    after = snapshot(root)
    assert after == before, f"partial output left behind: {sorted(set(after.items()) ^ set(before.items()))}"


def test_table_is_large_and_covers_every_kind_of_input() -> None:
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 30
    assert kinds == {"params", "cli", "data", "ticket", "registry", "tracking", "s3"}


@pytest.mark.e2e
@pytest.mark.parametrize("case_id", ["tracking-server-down-imp", "s3-no-credentials", "ticket-tampered-bytes"])
def test_installed_command_prints_one_line(case_id: str, template: Path, tmp_path: Path) -> None:
    """The console script itself (warnings, MLflow's own logging and all): still one line on stderr."""
    case = next(c for c in CASES if c.id == case_id)
    root = tmp_path / "study"
    shutil.copytree(template, root)
    params(paths={k: str(root / k) for k in ("data", "models", "results", "reports")},
           tracking={"uri": f"sqlite:///{root / 'mlflow.db'}"})(root)
    case.setup(root)
    (root / "mlflow.db").unlink()  # a first run: MLflow creates its tables and says so at INFO level
    done = run_lth(case.args, root, lth_env(**case.env))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lth: error: "), done.stderr
    assert case.names in done.stderr
