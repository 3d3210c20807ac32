"""`lth datasets`, `lth prepare`, and `lth pull cytomine` / `lth build wikiart` (a user's copy of a target set)."""

from __future__ import annotations

from pathlib import Path

import click

from lth.cli.options import PARAMS_OPTION
from lth.config import DatasetParams, Params, PathsConfig, PrepareConfig, load_params
from lth.errors import UserError


@click.command("datasets")
@PARAMS_OPTION
def datasets_cmd(params_path: str) -> None:
    """List the known datasets: role, classes, origin, whether prepared."""
    from lth.data.registry import dataset_rows

    params = load_params(Path(params_path)) if Path(params_path).is_file() else Params()
    rows = dataset_rows(params)
    headers = list(rows[0]) if rows else []
    widths = [max(len(str(h)), *(len(str(r[h])) for r in rows)) for h in headers]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        click.echo("  ".join(str(row[h]).ljust(w) for h, w in zip(headers, widths)))


@click.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Prepare every dataset named in prepare.datasets.")
@PARAMS_OPTION
def prepare_cmd(names: tuple[str, ...], all_: bool, params_path: str) -> None:
    """Write data/prepared/NAME (uint8 splits, labels, meta.json) for each NAME."""
    from lth.data.prepare import prepare_dataset
    from lth.data.registry import get_spec

    params = load_params(Path(params_path))
    todo = list(params.prepare.datasets) if all_ else list(names)
    if not todo:
        raise UserError("name a dataset to prepare (see `lth datasets`) or pass --all")
    for name in todo:
        get_spec(name)  # fail before any work on an unknown name
    for name in todo:
        out = prepare_dataset(name, params)
        click.echo(f"prepared {name} -> {out}")


def _study(path: str, dataset: str) -> tuple[DatasetParams, int, Path]:
    """(the dataset's params, prepare.seed, data root) from the params file, or defaults when there is none."""
    if not Path(path).is_file():
        return DatasetParams(), PrepareConfig().seed, Path(PathsConfig().data)
    params = load_params(Path(path))
    return params.prepare.datasets.get(dataset, DatasetParams()), params.prepare.seed, Path(params.paths.data)


@click.group("pull")
def pull() -> None:
    """Download a dataset from a server you have access to into data/raw/NAME."""


@pull.command("cytomine")
@click.option("--host", required=True, help="Cytomine server, e.g. https://research.cytomine.be")
@click.option("--project", required=True, help="Project id or name (e.g. ulb_anapath_lba).")
@click.option("--dataset", "dataset", required=True, help="Registered dataset name (e.g. human-lba).")
@click.option("--seed", type=int, default=None, help="Seed of the by-slide split (default: prepare.seed).")
@PARAMS_OPTION
def pull_cytomine(host: str, project: str, dataset: str, seed: int | None, params_path: str) -> None:
    """Dump a project's term-labelled annotation crops (keys from CYTOMINE_PUBLIC_KEY / CYTOMINE_PRIVATE_KEY)."""
    from lth.data import cytomine
    from lth.data.registry import get_spec

    spec = get_spec(dataset)
    if spec.origin != "cytomine":
        raise UserError(f"--dataset {dataset!r} is not a Cytomine dataset (origin {spec.origin!r})")
    dparams, default_seed, data_root = _study(params_path, dataset)
    manifest = cytomine.pull(host, project, dataset, dparams, default_seed if seed is None else seed, data_root / "raw")
    click.echo(f"pulled {dataset} -> {manifest}")


@click.group("build")
def build() -> None:
    """Build a reproducible subset manifest over a user's copy of a dataset."""


@build.command("wikiart")
@click.option(
    "--root", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of WikiArt images."
)
@click.option(
    "--metadata",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Metadata CSV (repeatable: e.g. ArtGAN's artist_train.csv and artist_val.csv).",
)
@click.option("--label", required=True, help="Label column (artist, genre, style, type ...).")
@click.option("--top", required=True, type=int, help="Keep the N most frequent classes (ties by name).")
@click.option("--seed", required=True, type=int, help="Seed of the stratified 80/10/10 split.")
@click.option(
    "--exclude-manifest", type=click.Path(dir_okay=False, path_type=Path), help="Keep this subset's images out."
)
@click.option("--path-column", default=None, help="File-name column (default: path, filename, file, image ...).")
@click.option(
    "--classes", type=click.Path(dir_okay=False, path_type=Path), help="ArtGAN-style 'index name' class list."
)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest CSV to write."
)
def build_wikiart(
    root: Path,
    metadata: tuple[Path, ...],
    label: str,
    top: int,
    seed: int,
    exclude_manifest: Path | None,
    path_column: str | None,
    classes: Path | None,
    output: Path,
) -> None:
    """Write a manifest (path, label, split, sha256) of the top-N classes of a WikiArt copy, "Unknown" excluded."""
    from lth.data import wikiart

    counts = wikiart.build(root, metadata, label, top, seed, output, exclude_manifest, path_column, classes)
    sizes = "/".join(str(sum(counts[s].values())) for s in ("train", "val", "test"))
    click.echo(f"wrote {output}: {len(counts['train'])} classes, train/val/test {sizes}")
