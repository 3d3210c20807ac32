"""Cytomine: pull a project's term-labelled annotation crops with the official client, resumably, split by slide.

data/raw/NAME/ gets crops/<image-id>_<annotation-id>.png (each renamed into place only once it decodes),
pull.json (where the crops came from) and, last, manifest.csv: a pull without a manifest is unfinished,
and running it again skips the crops already there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lth.config import DatasetParams
from lth.data.manifest import MANIFEST, load_user_copy, relative_to_manifest, write_manifest
from lth.data.registry import RawDataset, get_spec
from lth.data.splits import SPLIT_NAMES, group_split
from lth.errors import UserError
from lth.fsutil import atomic_write_json, sha256_file

KEY_VARS = ("CYTOMINE_PUBLIC_KEY", "CYTOMINE_PRIVATE_KEY")
CROPS = "crops"
PULL_INFO = "pull.json"
EXTRA_COLUMNS = ("image", "image_name", "annotation", "term")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # when the paper gives no split sizes


@dataclass(frozen=True)
class Crop:
    """One annotation to dump: its id, its slide and its (single) term."""

    annotation: int
    image: int
    image_name: str
    term: int
    label: str
    crop_url: str

    @property
    def filename(self) -> str:
        return f"{self.image}_{self.annotation}.png"


def keys_from_env(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(public, private) keys from the environment, or a UserError naming the missing variables."""
    env = os.environ if env is None else env
    missing = [v for v in KEY_VARS if not env.get(v)]
    if missing:
        raise UserError(
            f"Cytomine keys missing: set {' and '.join(missing)} (your account page on the Cytomine server)"
        )
    return env[KEY_VARS[0]], env[KEY_VARS[1]]


def base_url(host: str) -> str:
    """http(s)://host without a trailing slash (http when no scheme is given, as the client does)."""
    host = host.rstrip("/")
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def connect(host: str, keys: tuple[str, str]) -> Any:
    """A logged-in cytomine.Cytomine client; unreachable hosts and rejected keys are UserErrors."""
    import requests
    from cytomine import Cytomine

    url = base_url(host)
    try:
        # the client itself would retry an unreachable host for two minutes before going on
        requests.get(f"{url}/server/ping", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        raise UserError(
            f"Cytomine host {url} unreachable ({type(exc).__name__}); check --host and the network"
        ) from None
    client = Cytomine(url, *keys, verbose=logging.CRITICAL, use_cache=False, configure_logging=False)
    if not client.current_user:
        raise UserError(f"Cytomine host {url} rejected the keys in {' / '.join(KEY_VARS)}")
    return client


def find_project(project: str) -> Any:
    """The project with this id or name."""
    from cytomine.models import Project, ProjectCollection

    if project.isdigit():
        found = Project().fetch(int(project))
    else:
        projects = ProjectCollection().fetch()
        found = projects.find_by_attribute("name", project) if projects is not False else None
    if not found:
        raise UserError(f"Cytomine project {project!r} not found or not readable with these keys")
    return found


def list_crops(project: Any) -> tuple[list[Crop], int]:
    """The project's annotations that carry exactly one of its terms, and how many others were skipped."""
    from cytomine.models import AnnotationCollection, ImageInstanceCollection, TermCollection

    terms = TermCollection().fetch_with_filter("project", project.id)
    if not terms:
        raise UserError(f"Cytomine project {project.name!r} ({project.id}) has no terms: nothing to label crops with")
    term_names = {t.id: t.name for t in terms}
    images = ImageInstanceCollection().fetch_with_filter("project", project.id)
    if images is False:
        raise UserError(f"Cytomine project {project.name!r}: could not list its images")
    image_names = {im.id: str(getattr(im, "instanceFilename", None) or im.id) for im in images}
    annotations = AnnotationCollection(
        project=project.id, terms=sorted(term_names), showMeta=True, showTerm=True, showWKT=False
    ).fetch()
    if annotations is False:
        raise UserError(f"Cytomine project {project.name!r}: could not list its annotations")
    crops, skipped = [], 0
    for an in annotations:
        own = [t for t in (an.term or []) if t in term_names]
        if len(own) != 1 or an.image not in image_names:
            skipped += 1  # unlabelled, ambiguous, or on an image outside the project
            continue
        crop = Crop(int(an.id), int(an.image), image_names[an.image], own[0], term_names[own[0]], str(an.cropURL))
        crops.append(crop)
    if not crops:
        raise UserError(f"Cytomine project {project.name!r}: no annotation carries exactly one of its terms")
    return sorted(crops, key=lambda c: (c.image, c.annotation)), skipped


def _crop_error(crop: Crop, host: str, what: str) -> UserError:
    return UserError(
        f"Cytomine {host}: crop of annotation {crop.annotation} (image {crop.image}) {what}; "
        "run the same pull again to resume"
    )


def dump_crop(crop: Crop, dest: Path, dump_params: Mapping[str, int | None], host: str) -> None:
    """Download one crop to a temporary file, check that it decodes, then rename it to `dest`."""
    from cytomine.models import Annotation

    from lth.data.images import decode_image

    # the client fixes the extension itself (anything but jpg/png/tif becomes .jpg), so the partial file keeps it
    tmp = dest.with_name(f".{dest.stem}.partial{dest.suffix}")
    try:
        annotation = Annotation().populate({"id": crop.annotation, "cropURL": crop.crop_url})
        try:
            annotation.dump(dest_pattern=str(tmp), override=True, **dump_params)
        except Exception as exc:  # the client raises DumpError, or requests' errors mid-stream
            raise _crop_error(crop, host, f"failed ({type(exc).__name__})") from None
        try:
            decode_image(tmp)
        except UserError:
            raise _crop_error(crop, host, "is truncated or corrupt") from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_dump_params(crops_dir: Path, dump_params: Mapping[str, int | None]) -> None:
    """Crops already on disk must have been dumped with the same zoom and size, else resuming would mix them."""
    record = crops_dir / ".dump.json"
    if record.is_file():
        earlier = json.loads(record.read_text())
        if earlier != dict(dump_params):
            raise UserError(
                f"{crops_dir} holds crops dumped with {earlier}, not {dict(dump_params)}; "
                "delete that folder or restore the earlier crop_zoom/crop_max_size"
            )
    else:
        atomic_write_json(record, dict(dump_params))


def pull(host: str, project: str, dataset: str, dparams: DatasetParams, seed: int, raw_root: Path) -> Path:
    """Dump every term-labelled crop of `project` into raw_root/<dataset>/, split by slide; returns the manifest."""
    spec = get_spec(dataset)
    keys = keys_from_env()
    connect(host, keys)
    found = find_project(project)
    crops, skipped = list_crops(found)
    fractions = spec.paper_splits or DEFAULT_FRACTIONS
    owner = group_split([str(c.image) for c in crops], fractions, seed)
    if len(set(owner.tolist())) < len(SPLIT_NAMES):
        slides = len({c.image for c in crops})
        raise UserError(f"Cytomine project {found.name!r}: {slides} slide(s) cannot make train/val/test by slide")
    out = raw_root / dataset
    crops_dir = out / CROPS
    if "{" in str(crops_dir) or "}" in str(crops_dir):  # the client reads {braces} in a dump path as placeholders
        raise UserError(f"{crops_dir}: the data folder's path must not contain {{ or }}")
    crops_dir.mkdir(parents=True, exist_ok=True)
    dump_params = {"zoom": dparams.crop_zoom, "max_size": dparams.crop_max_size}
    _check_dump_params(crops_dir, dump_params)
    for crop in tqdm(crops, desc=f"pull {dataset}", unit="crop", disable=None):
        dest = crops_dir / crop.filename
        if not dest.is_file():
            dump_crop(crop, dest, dump_params, base_url(host))
    manifest = out / MANIFEST
    rows = [
        {
            **asdict(c),
            "path": relative_to_manifest(crops_dir / c.filename, manifest),
            "split": SPLIT_NAMES[k],
            "sha256": sha256_file(crops_dir / c.filename),
        }
        for c, k in zip(crops, owner.tolist(), strict=True)
    ]
    atomic_write_json(
        out / PULL_INFO,
        {
            "host": base_url(host),
            "project": {"id": found.id, "name": found.name},
            "seed": seed,
            "split_by": "slide (image instance)",
            "split_fractions": list(fractions),
            "dump": dump_params,
            "crops": len(crops),
            "skipped_annotations": skipped,
        },
    )
    write_manifest(manifest, rows, extra=EXTRA_COLUMNS)  # last: its presence means the pull is complete
    return manifest


def load(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """Origin 'cytomine': a finished pull in raw_dir, or the user's folder/manifest at prepare.datasets.NAME.path."""
    del seed  # splits were made by slide at pull time (or come with the user's folder)
    return load_user_copy(dparams, raw_dir, "run `lth pull cytomine --host HOST --project PROJECT --dataset {name}`, "
                                            "or set prepare.datasets.{name}.path to a split/class/image folder")
