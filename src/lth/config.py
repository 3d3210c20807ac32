"""params.yaml -> frozen dataclasses, validated with errors that name the key path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from lth.errors import UserError
from lth.validation import FieldProblem, build, check

ARMS = ("scratch", "transfer", "target", "reinit", "trained", "related", "size")


class ConfigError(UserError):
    """A params file is wrong; the message names the file and the key path."""


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class DatasetParams:
    """How much of one dataset to prepare, and where a user's copy lives."""

    train: int | None = None  # max training images (None: all the origin gives / paper size)
    val: int | None = None  # max validation images
    test: int | None = None  # max test images
    path: str | None = None  # a user's copy (folder / WikiArt manifest), when the origin needs one
    crop_zoom: int | None = None  # `lth pull cytomine`: zoom level of the dumped crops (None: full resolution)
    crop_max_size: int | None = None  # `lth pull cytomine`: longest side of a dumped crop, px (None: as annotated)
    allow_fewer: bool = False  # keep a split smaller than train/val/test asks (recorded in meta.json), not fail

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, "must be a positive number of images or null")
        check(self.crop_zoom is None or self.crop_zoom >= 0, "crop_zoom", "must be a zoom level >= 0 or null")
        check(self.crop_max_size is None or self.crop_max_size >= 8, "crop_max_size", "must be >= 8 px or null")


@dataclass(frozen=True)
class PathsConfig:
    """Where the pipeline keeps its files (relative to the working directory)."""

    data: str = "data"  # raw/ and prepared/ live here
    models: str = "models"  # tickets/ lives here
    results: str = "results"  # per-run metrics for DVC
    reports: str = "reports"  # the HTML/Markdown report

    @property
    def units_csv(self) -> Path:
        """results/study/units.csv: `lth study run`'s record of where and when each unit ran (the timeline)."""
        return Path(self.results) / "study" / "units.csv"


@dataclass(frozen=True)
class PrepareConfig:
    """`lth prepare`: image size and geometry, split seed and per-dataset subset sizes."""

    image_size: int = 32  # side of the stored square images, px
    seed: int = 0  # seed of subsets and splits
    geometry: Literal["stretch", "pad", "center-crop"] = "stretch"  # how a non-square image becomes square
    datasets: Mapping[str, DatasetParams] = field(default_factory=dict)  # datasets of this study

    def __post_init__(self) -> None:
        check(8 <= self.image_size <= 1024, "image_size", "must be between 8 and 1024 px")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: the paper's resnet50, or a small CIFAR-style ResNet for the demo."""

    arch: Literal["resnet50", "resnet"] = "resnet"
    depth: int = 8  # CIFAR-style ResNet depth, 6n+2 (ignored by resnet50)
    width: int = 16  # channels of the first stage of the CIFAR-style ResNet

    def __post_init__(self) -> None:
        check(self.depth >= 8 and (self.depth - 2) % 6 == 0, "depth", "must be 6n+2 and >= 8 (8, 14, 20, 32, ...)")
        check(1 <= self.width <= 512, "width", "must be between 1 and 512")

    @property
    def name(self) -> str:
        """Short architecture name used in paths and registry names."""
        return "resnet50" if self.arch == "resnet50" else f"resnet{self.depth}w{self.width}"


@dataclass(frozen=True)
class TrainConfig:
    """fit(): SGD with Nesterov momentum, random crop, early stopping on validation loss."""

    batch_size: int = 64  # paper: 64
    lr: float = 0.01  # not in the paper's text (lost); tuned by `lth tune`
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"  # rate per epoch (paper: annealed, values lost)
    lr_anneal_epochs: tuple[int, ...] = ()  # step: after each of these epochs the rate is multiplied by the factor
    lr_anneal_factor: float = 0.1  # step: that factor, in (0, 1)
    momentum: float = 0.9  # paper: Nesterov momentum 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # lost from the paper; 1e-4 is the usual value
    max_epochs: int = 30  # epoch cap (early stopping usually ends sooner)
    min_epochs: int = 0  # never stop before this many epochs
    patience: int = 5  # paper: stop when val loss has not decreased for 5 epochs
    crop_size: int = 28  # random-crop side, px (lost from the paper); eval uses the centre crop
    eval_batch_size: int = 512
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast on CUDA
    channels_last: bool = False  # channels_last memory format on CUDA
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(0 < self.lr <= 10, "lr", "must be in (0, 10]")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.lr_schedule != "step" or len(self.lr_anneal_epochs) > 0, "lr_anneal_epochs",
              "must list the epochs after which lr_schedule: step anneals (e.g. [15, 30])")
        check(self.lr_schedule == "step" or not self.lr_anneal_epochs, "lr_anneal_epochs",
              f"is only used by lr_schedule: step (it is {self.lr_schedule}); remove it or set lr_schedule: step")
        check(all(e >= 1 for e in self.lr_anneal_epochs)
              and list(self.lr_anneal_epochs) == sorted(set(self.lr_anneal_epochs)),
              "lr_anneal_epochs", "must be increasing epoch numbers >= 1")
        check(all(e < self.max_epochs for e in self.lr_anneal_epochs), "lr_anneal_epochs",
              f"must be below max_epochs ({self.max_epochs}): a later annealing never happens")
        check(0 < self.lr_anneal_factor < 1, "lr_anneal_factor", "must be in (0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_epochs >= 1, "max_epochs", "must be >= 1")
        check(0 <= self.min_epochs <= self.max_epochs, "min_epochs", "must be in [0, max_epochs]")
        check(self.patience >= 1, "patience", "must be >= 1")
        check(self.crop_size >= 8, "crop_size", "must be >= 8 px")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "must be auto, cpu, cuda or cuda:N",
        )
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")


@dataclass(frozen=True)
class ImpConfig:
    """`lth imp`: iterative magnitude pruning with late resetting."""

    sources: tuple[str, ...] = ("fashion-mnist",)  # datasets to find tickets on
    seeds: tuple[int, ...] = (0,)  # paper: 4 seeds
    rounds: int = 31  # paper: 31 rounds, round k keeps 0.8^k
    pruning_rate: float = 0.2  # fraction of the remaining weights pruned per round
    rewind_epoch: int = 2  # late resetting: surviving weights go back to epoch k of the dense run
    keep_epochs: int = 0  # also keep dense checkpoints of epochs 0..keep_epochs (for `lth tune`)

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "must name at least one dataset")
        check(len(self.seeds) > 0, "seeds", "must list at least one seed")
        check(1 <= self.rounds <= 60, "rounds", "must be between 1 and 60")
        check(0 < self.pruning_rate < 1, "pruning_rate", "must be in (0, 1)")
        check(self.rewind_epoch >= 0, "rewind_epoch", "must be >= 0")
        check(self.keep_epochs >= 0, "keep_epochs", "must be >= 0")


@dataclass(frozen=True)
class RelatedPair:
    """A related non-natural source whose tickets transfer to a target (paper 4.3.2)."""

    source: str
    target: str


@dataclass(frozen=True)
class TransferConfig:
    """`lth transfer`: the arms of the study, fine-tuned on each target."""

    targets: tuple[str, ...] = ("digits",)
    sources: tuple[str, ...] = ("fashion-mnist",)  # natural sources whose tickets transfer
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0,)
    rounds: tuple[int, ...] | None = None  # ticket rounds to fine-tune (None: every round)
    related: tuple[RelatedPair, ...] = ()
    size_fractions: tuple[float, ...] = (0.5,)  # reduced training-set fractions for the `size` arm
    lr: float | None = None  # fine-tuning learning rate (None: train.lr)
    max_epochs: int | None = None  # fine-tuning epoch cap (None: train.max_epochs)

    def __post_init__(self) -> None:
        check(len(self.targets) > 0, "targets", "must name at least one dataset")
        unknown = [a for a in self.arms if a not in ARMS]
        check(not unknown, "arms", f"unknown arm {unknown[0] if unknown else ''!r}; choose from {', '.join(ARMS)}")
        check(len(self.seeds) > 0, "seeds", "must list at least one seed")
        check(self.rounds is None or all(r >= 0 for r in self.rounds), "rounds", "must be rounds >= 0")
        check(all(0 < f < 1 for f in self.size_fractions), "size_fractions", "must be fractions in (0, 1)")
        check(self.lr is None or 0 < self.lr <= 10, "lr", "must be in (0, 10] or null")
        check(self.max_epochs is None or self.max_epochs >= 1, "max_epochs", "must be >= 1 or null")


@dataclass(frozen=True)
class TuneConfig:
    """`lth tune`: Optuna search over the rewind epoch and the learning rate."""

    source: str = "fashion-mnist"
    target: str = "digits"
    round: int = 3  # ticket round (sparsity 1 - 0.8^round) fine-tuned in each trial
    n_trials: int = 8
    rewind_epochs: tuple[int, int] = (0, 3)  # integer search range, inclusive
    lr_range: tuple[float, float] = (1e-3, 1e-1)  # log-uniform search range
    seed: int = 0
    study_name: str = "tune"
    storage: str | None = None  # Optuna RDB URL (None: sqlite file under results/)
    max_epochs: int | None = None  # fine-tuning epoch cap per trial (None: train.max_epochs)

    def __post_init__(self) -> None:
        lo, hi = self.rewind_epochs
        check(0 <= lo <= hi, "rewind_epochs", "must be [low, high] with 0 <= low <= high")
        lo_lr, hi_lr = self.lr_range
        check(0 < lo_lr < hi_lr <= 10, "lr_range", "must be [low, high] with 0 < low < high <= 10")
        check(self.n_trials >= 1, "n_trials", "must be >= 1")
        check(self.round >= 0, "round", "must be >= 0")
        check(self.max_epochs is None or self.max_epochs >= 1, "max_epochs", "must be >= 1 or null")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs go and whether tickets are registered."""

    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlflow.db
    register: bool = True  # register every ticket as a model version
    artifact_location: str | None = None  # e.g. s3://bucket/mlflow for new experiments
    system_metrics: bool = True  # log each job's CPU, memory (and GPU) use as MLflow system metrics, every 10 s
    retry_seconds: float = 300.0  # how long a job waits for a tracking server that stopped answering (restart)

    def __post_init__(self) -> None:
        check(self.retry_seconds >= 0, "retry_seconds", "must be >= 0 (0: fail at the first unanswered write)")


def _gpu_share(value: float) -> bool:
    """Ray takes a fraction of one GPU (several units share it) or whole GPUs, never 1.5."""
    return value >= 0 and (value <= 1 or float(value).is_integer())


@dataclass(frozen=True)
class EngineConfig:
    """`lth study run`: which executor runs the study's units, and each unit's share of a worker."""

    kind: Literal["local", "ray"] = "local"  # local: one process, as `dvc repro`; ray: every unit a Ray task
    address: str | None = None  # Ray cluster, host:port of `ray start --head` (None: a Ray started here)
    imp_gpus: float = 0.0  # GPUs per IMP round (fractions share a GPU: 0.5 = two rounds per GPU)
    imp_cpus: float = 1.0  # CPUs per IMP round
    finetune_gpus: float = 0.0  # GPUs per fine-tune (fractions share a GPU)
    finetune_cpus: float = 1.0  # CPUs per fine-tune
    max_retries: int = 2  # reruns of a unit whose worker died or failed, before the unit counts as failed
    finetunes_in_flight: int | None = None  # cap on fine-tunes queued at once (None: the cluster's slots)

    def __post_init__(self) -> None:
        for name in ("imp_gpus", "finetune_gpus"):
            check(_gpu_share(getattr(self, name)), name, "must be a fraction of one GPU (0..1) or whole GPUs")
        for name in ("imp_cpus", "finetune_cpus"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.max_retries >= 0, "max_retries", "must be >= 0")
        check(self.finetunes_in_flight is None or self.finetunes_in_flight >= 1, "finetunes_in_flight",
              "must be >= 1 or null")


@dataclass(frozen=True)
class ReportConfig:
    """`lth report`: Welch tests against scratch and the target's tickets, corrected per target and table."""

    alpha: float = 0.05  # significance level of the corrected tests (family-wise for holm/bonferroni)
    correction: Literal["holm", "bonferroni", "fdr_bh"] = "holm"  # multiple-comparison correction per family
    min_seeds: int = 3  # fewest seeds on each side of a test; fewer: "too few seeds to test", no p-value

    def __post_init__(self) -> None:
        check(0 < self.alpha < 1, "alpha", "must be in (0, 1)")
        check(self.min_seeds >= 2, "min_seeds", "must be >= 2 (Welch's test needs a variance on each side)")


@dataclass(frozen=True)
class Params:
    """The whole study: one section per command."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    imp: ImpConfig = field(default_factory=ImpConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        check(
            self.imp.rewind_epoch <= self.train.max_epochs,
            "imp.rewind_epoch",
            f"({self.imp.rewind_epoch}) must not exceed train.max_epochs ({self.train.max_epochs})",
        )
        check(
            self.train.crop_size <= self.prepare.image_size,
            "train.crop_size",
            f"({self.train.crop_size}) must not exceed prepare.image_size ({self.prepare.image_size})",
        )
        check(
            self.tune.rewind_epochs[1] <= self.train.max_epochs,
            "tune.rewind_epochs",
            f"upper bound must not exceed train.max_epochs ({self.train.max_epochs})",
        )


def arm_rounds(params: Params, arm: str) -> list[int]:
    """The ticket rounds an arm runs: scratch is dense only; a re-initialised dense network is scratch."""
    if arm == "scratch":
        return [0]
    rounds = params.transfer.rounds if params.transfer.rounds is not None else range(params.imp.rounds + 1)
    return [r for r in rounds if not (arm == "reinit" and r == 0)]


def params_from_dict(raw: Mapping[str, Any], source: str = "params") -> Params:
    """Validate a raw mapping into Params; a problem is a ConfigError naming `source` and the key path."""
    try:
        return build(Params, dict(raw), "")
    except FieldProblem as exc:
        raise ConfigError(f"{source}: {exc.key}: {exc.message}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params FILE)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of sections")
    return params_from_dict(raw, str(path))


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-ready form of a config object (for logging the same values to MLflow)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config section, e.g. {'train.lr': 0.01}."""
    data = to_dict(obj)
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = data
    return out
