"""Typed experiment settings.

A config file is the Hydrogen Torch experiment YAML (accepted exactly as Hydrogen Torch writes it) plus a
few optional gunsound sections (`storage`, `scoring`, `search_space`) and keys. Every key maps onto a field
of a dataclass below; an unknown key or a value of the wrong type raises `ConfigError` naming the key and
the file. Configuration is data: the code reads these objects, never the raw YAML.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_plus, urlsplit

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ArchitectureConfig:
    backbone: str = "resnet50"
    dropout: float = 0.0
    pool: Literal["Average", "Max", "GeM", "Average + Max"] = "Average"
    pretrained: bool = True
    # gunsound: a local or s3:// weights file used instead of the model hub when pretrained is true.
    pretrained_weights: str | None = None


@dataclass
class AudioConfig:
    # Auto: sample rate and training chunk are chosen from the data (see dataset.choose_audio_parameters).
    audio_parameters: Literal["Auto", "Manual"] = "Auto"
    hop_size: int = 512
    maximum_frequency: int = 16000
    mel_frequency_bins: int = 128
    minimum_frequency: int = 50
    sample_rate: int = 48000
    # gunsound: "Peak" measures each spectrogram from its loudest bin (see features.LogMelSpectrogram).
    spectrogram_normalization: Literal["No", "Yes", "Peak"] = "No"
    stft_window_size: int = 2048
    training_chunk_seconds: float = 60.0


@dataclass
class AugmentationConfig:
    mix_audio: Literal["Disabled", "Mixup"] = "Disabled"
    mix_concentration: float = 1.0
    mix_iterations: int = 1
    mix_probability: float = 1.0
    mix_target: Literal["Ratio", "Max"] = "Ratio"
    # gunsound: SpecAugment-style masks on the log-mel spectrogram (0 disables).
    time_mask_frames: int = 0
    frequency_mask_bins: int = 0
    # gunsound: a random smooth equaliser per training clip, its largest gain or cut up to this many dB (a
    # recorder's, a room's and the distance's colouring; see augment.colour). 0 disables.
    colouring_db: float = 0.0


@dataclass
class DatasetConfig:
    audio_column: str = "image"
    data_folder: str = ""
    data_folder_test: str | None = None
    data_sample: float = 1.0
    data_sample_choice: list[str] = field(default_factory=lambda: ["Train", "Validation"])
    folds: list[int] = field(default_factory=lambda: [0])
    group_fold_column: str | None = None
    label_columns: list[str] = field(default_factory=lambda: ["class"])
    test_dataframe: str | None = None
    train_dataframe: str = ""
    unlabeled_dataframe: str | None = None
    validation_dataframe: str | None = None
    validation_size: float = 0.2
    validation_strategy: Literal["kfold", "custom"] = "kfold"
    # gunsound: the label value of clips without a gunshot (all-zero targets), and an optional fixed class list.
    background_label: str = "background"
    classes: list[str] | None = None


@dataclass
class EnvironmentConfig:
    gpus: list[str] = field(default_factory=lambda: ["0"])
    mixed_precision_inference: bool = False
    mixed_precision_training: bool = True
    # Hydrogen Torch's data-loader workers; gunsound caps its CPU decode tasks with it.
    number_of_workers: int = 4
    seed: int = -1
    # gunsound: where work runs. auto: on GPUs when the cluster has or may launch a GPU node (an autoscaler's
    # node types count, not only the nodes alive at submit time); cpu: never ask for a GPU; cuda: always.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # gunsound: Ray Train sizing. None means: one worker per listed GPU when GPUs are used, else one.
    workers_per_fold: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    ray_address: str | None = None
    # gunsound: a Train worker whose dataset shard is estimated under this size reads it once and shuffles it
    # in memory every epoch (no per-epoch Ray Data execution); larger shards stream every epoch. 0: always stream.
    shard_cache_mb: float = 2048.0


@dataclass
class LoggingConfig:
    # Experiment tracking (see gunsound.tracking); Hydrogen Torch writes None or Neptune.
    logger: Literal["MLflow", "TensorBoard", "Neptune"] | None = None
    neptune_project: str = ""
    number_of_audios: int = 8
    # gunsound: an MLflow tracking server (http(s)://, databricks, sqlite:///...); None: OUTPUT/mlflow.db.
    # Its credentials come from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), never from here.
    tracking_uri: str | None = None


@dataclass
class PredictionConfig:
    inference_chunk_method: Literal["Fix", "Sliding"] = "Fix"
    inference_chunk_seconds: float = 60.0
    max_inference_chunk_seconds: float = 600.0
    metric: Literal["ROC_AUC", "Accuracy", "F1", "LogLoss"] = "ROC_AUC"
    probability_threshold: float = 0.5


@dataclass
class TrainingConfig:
    automatically_adjust_batch_size: bool = False
    batch_size: int = 16
    build_scoring_pipelines: bool = True
    calculate_train_metric: bool = False
    differential_learning_rate: float = 0.001
    differential_learning_rate_layers: list[str] = field(default_factory=list)
    drop_last_batch: bool = True
    epochs: int = 5
    evaluation_epochs: float = 1.0
    grad_accumulation: int = 1
    gradient_clip: float = 0.0
    learning_rate: float = 0.001
    loss_function: Literal["BCE", "CrossEntropy"] = "BCE"
    optimizer: Literal["AdamW", "Adam", "SGD"] = "AdamW"
    run_interpretations: bool = True
    save_best_checkpoint: bool = False
    schedule: Literal["Cosine", "Linear", "Constant"] = "Cosine"
    train_validation_data: bool = False
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0


@dataclass
class ScoringConfig:
    """gunsound: how archives are cut for scoring (prediction.inference_chunk_method picks Fix or Sliding)."""

    window_seconds: float | None = None  # Sliding: default the training chunk
    hop_seconds: float | None = None  # Sliding: default half a window
    read_seconds: float = 60.0  # audio read as one frame range, one unit of parallel work
    batch_size: int = 64
    shard_files: int = 256  # files committed to the output together (the unit of resume)
    onset_detection: bool = True
    onset_threshold_db: float = 12.0  # a shot's blast must rise this far above the running noise floor
    actors: int | None = None  # scorer actors; default one per GPU, or one per CPU on a CPU-only cluster


@dataclass
class StorageConfig:
    """Where S3-compatible data lives. Credentials never go here: they come from the AWS environment."""

    endpoint_url: str | None = None
    region: str | None = None


@dataclass
class Config:
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    experiment_name: str = "gunsound"
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prediction: PredictionConfig = field(default_factory=PredictionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # gunsound: Ray Tune search space, e.g. {"training.learning_rate": {"loguniform": [1e-4, 1e-2]}}.
    search_space: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)


# Hydrogen Torch writes missing values as the string "None".
_NONE_STRINGS = {"None", "none", "null", ""}
_INT_STRING = re.compile(r"[+-]?[0-9]+")


class _YamlInt(int):
    """An integer YAML read from text, with that text: a string-typed key keeps what was written."""

    yaml_text: str


class _YamlFloat(float):
    """A float YAML read from text, with that text (see _YamlInt)."""

    yaml_text: str


def _plain(value: Any) -> Any:
    """`value` with every _YamlInt/_YamlFloat in it a plain int/float, so that a Config holds only the types
    yaml.safe_dump and the rest of the code know."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check `value` against a type annotation, converting only where the meaning is unambiguous."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r} ({type(_plain(value)).__name__})")

    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value in _NONE_STRINGS):
            return None
        return _convert(value, non_none[0], key, source)
    if origin is Literal:
        # YAML 1.1 reads an unquoted No/Yes as a boolean.
        if isinstance(value, bool) and ("Yes" in args or "No" in args):
            value = "Yes" if value else "No"
        if value not in args:
            fail("one of " + ", ".join(repr(a) for a in args))
        return _plain(value)
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return _plain(value)
    if annotation is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if annotation is int:
        # Hydrogen Torch quotes fold numbers (folds: ['4']). ASCII digits only: str.isdigit() also takes '²'.
        if isinstance(value, str) and _INT_STRING.fullmatch(value.strip()):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        return float(value)
    if annotation is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # YAML read the text as a number: keep it as written (a folder 2024_01 is not 202401, a class 010
            # is not 8)
            return getattr(value, "yaml_text", str(value))
        if not isinstance(value, str):
            fail("a string")
        return value
    if annotation is Any:
        return _plain(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(repr(prefix + '.' + k if prefix else k) for k in unknown)}"
            f" in {where}; known keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key, source)
        else:
            kwargs[name] = _convert(value, hint, key, source)
    return cls(**kwargs)


def _scoring_checks(sc: ScoringConfig) -> list[tuple[str, bool, str]]:
    return [
        ("scoring.window_seconds", sc.window_seconds is None or sc.window_seconds > 0,
         "positive (or left out for the training chunk)"),
        ("scoring.hop_seconds", sc.hop_seconds is None or sc.hop_seconds > 0,
         "positive (or left out for half a window)"),
        # Where the window is left out it is the model's chunk, known only when scoring resolves it.
        ("scoring.hop_seconds", sc.hop_seconds is None or sc.window_seconds is None
         or sc.hop_seconds <= sc.window_seconds,
         "at most scoring.window_seconds (a longer hop leaves audio between windows unscored and starts windows "
         "past a file's end)"),
        ("scoring.read_seconds", sc.read_seconds > 0, "positive"),
        ("scoring.batch_size", sc.batch_size >= 1, "at least 1"),
        ("scoring.shard_files", sc.shard_files >= 1, "at least 1"),
        ("scoring.onset_threshold_db", sc.onset_threshold_db > 0, "a positive number of dB"),
        ("scoring.actors", sc.actors is None or sc.actors >= 1,
         "at least 1 (or left out for one per GPU or CPU)"),
    ]


# Query keys that carry a secret (compared lower-case, whole or as a word of the key: between _ - . or at a
# camelCase boundary): a tracking URI is written to the run's config.yaml, so credentials never go there.
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "token", "secret", "key", "sig", "signature", "auth",
                               "credential", "credentials", "apikey", "accesskey", "secretkey"})
# Words that name a secret wherever they stand in a key (sslpassword, sastoken, xapikey).
SECRET_QUERY_WORDS = ("password", "passwd", "token", "secret", "credential", "apikey", "signature")


def _query_parts(query: str) -> list[tuple[str, bool]]:
    """(key, has a value) of each `&`- or `;`-separated part of a URI's query, the key percent-decoded."""
    return [(unquote_plus(part.split("=", 1)[0]), "=" in part) for part in re.split("[&;]", query) if part]


def secret_query_keys(uri: str) -> list[str]:
    """The keys of `uri`'s query that carry a secret (see SECRET_QUERY_KEYS), as written."""
    try:
        query = urlsplit(uri).query
    except ValueError:
        return []
    return [key for key, _ in _query_parts(query) if _names_a_secret(key)]


def _names_a_secret(key: str) -> bool:
    words = {w.lower() for w in re.split(r"[_\-. ]|(?<=[a-z0-9])(?=[A-Z])", key) if w}
    lower = key.lower()
    return lower in SECRET_QUERY_KEYS or bool(SECRET_QUERY_KEYS & words) or any(w in lower for w in SECRET_QUERY_WORDS)


def redact_uri(uri: str) -> str:
    """`uri` fit to log or write: without user information or fragment, every query value masked
    (`postgresql://u:p@db/mlflow?user=u` -> `postgresql://db/mlflow?user=***`). A URI without these is unchanged."""
    try:
        split = urlsplit(uri)
    except ValueError:  # not parseable (an unclosed [ in the host): nothing of it is shown
        return "<a tracking URI that is not valid>"
    base = uri.split("#", 1)[0].split("?", 1)[0]
    if "@" in split.netloc:
        base = base.replace(f"//{split.netloc}", f"//{split.netloc.rsplit('@', 1)[1]}", 1)
    if not split.query:
        return base
    masked = [f"{key}=***" if has_value else "***" for key, has_value in _query_parts(split.query)]
    return f"{base}?{'&'.join(masked)}"


def _uri_credentials(uri: str | None) -> str:
    """What in a URI (a tracking store, an S3 endpoint, a Ray address) is a credential, named without its
    value; "" when nothing is. The resolved config is printed and written to the run's config.yaml."""
    if uri is None:
        return ""
    try:
        split = urlsplit(uri)
        userinfo = split.username or split.password
    except ValueError:
        return ""
    if userinfo:
        return "user information (user:password@)"
    keys = secret_query_keys(uri)
    return f"query key(s) {', '.join(repr(k) for k in keys)}" if keys else ""


def _address_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """An S3 endpoint or a Ray address with a credential in it: refused, as in a tracking URI."""
    checks = []
    for key, uri, way in (("storage.endpoint_url", cfg.storage.endpoint_url,
                           "S3 credentials come from the standard AWS chain: environment, profile, instance role"),
                          ("environment.ray_address", cfg.environment.ray_address,
                           "a cluster's credentials come from the environment of the job")):
        found = _uri_credentials(uri)
        checks.append((key, not found, f"free of credentials, found {found} ({way})"))
    return checks


def _logging_checks(lg: LoggingConfig) -> list[tuple[str, bool, str]]:
    credentials = _uri_credentials(lg.tracking_uri)
    return [
        ("logging.tracking_uri", lg.tracking_uri is None or lg.logger == "MLflow", "left out unless logging.logger is MLflow"),
        ("logging.tracking_uri", not credentials,
         f"free of credentials, found {credentials} (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN from the "
         "environment)"),
        ("logging.neptune_project", lg.logger != "Neptune" or "/" in lg.neptune_project,
         "a Neptune project as workspace/project when logging.logger is Neptune"),
    ]


# The package each logger needs, and how to install it.
LOGGER_PACKAGES = {"MLflow": ("mlflow", "pip install 'gunsound[mlflow]'"),
                   "TensorBoard": ("tensorboard", "pip install 'gunsound[tensorboard]'"),
                   "Neptune": ("neptune", "pip install neptune")}


def check_logger_installed(lg: LoggingConfig, source: str) -> None:
    """A logger whose package is missing is a config error now, not a failure after the data is featurized."""
    import importlib.util

    if lg.logger is None:
        return
    package, install = LOGGER_PACKAGES[lg.logger]
    needs = [package] + (["sqlalchemy", "alembic"] if lg.logger == "MLflow" and lg.tracking_uri is None else [])
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{source}: key 'logging.logger' is {lg.logger}, which needs the "
                          f"{', '.join(missing)} package(s): {install}")


def check_dataset_sources(ds: DatasetConfig, source: str) -> None:
    """The class and fold lists must be without repeats, the dataframes a config names ones gunsound reads, and
    validation_strategy must say what plan.prepare does (a validation_dataframe, whenever one is set, replaces the folds). Checked on the config a
    user writes, not on a run's saved config.yaml, which earlier versions wrote unchecked and which must still
    load for scoring and reports."""
    for key, value in [("dataset.test_dataframe", ds.test_dataframe),
                       ("dataset.unlabeled_dataframe", ds.unlabeled_dataframe)]:
        if value is not None:
            raise ConfigError(f"{source}: key '{key}' must be left out (None): gunsound does not use it "
                              f"(got {value!r}); to score a test set, run `gunsound score`")
    # A class listed twice gets two outputs, one never trained; a fold listed twice trains and ensembles twice;
    # the background label as a class is an output that never sees a positive (its clips' targets are zeros).
    if (twice := _repeated(ds.classes or [])) is not None:
        raise ConfigError(f"{source}: key 'dataset.classes' lists {twice!r} twice")
    if ds.classes and ds.background_label in ds.classes:
        raise ConfigError(f"{source}: key 'dataset.classes' must be a list without dataset.background_label "
                          f"{ds.background_label!r} (its clips have all-zero targets)")
    if (twice := _repeated(ds.folds)) is not None:
        raise ConfigError(f"{source}: key 'dataset.folds' lists fold {twice} twice")
    # A label column listed twice reads as one-hot columns, every row of them "empty".
    if (twice := _repeated(ds.label_columns)) is not None:
        raise ConfigError(f"{source}: key 'dataset.label_columns' lists {twice!r} twice")
    if ds.validation_strategy == "custom" and not ds.validation_dataframe:
        raise ConfigError(f"{source}: key 'dataset.validation_strategy' is custom, which needs "
                          "dataset.validation_dataframe (or use kfold: folds of validation_size)")
    if ds.validation_strategy == "kfold" and ds.validation_dataframe:
        raise ConfigError(f"{source}: key 'dataset.validation_dataframe' is set, which needs "
                          "dataset.validation_strategy: custom (kfold splits the training data instead)")


def _repeated(values: list[Any]) -> Any:
    """The first value listed twice, or None."""
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _float_settings(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float setting: .inf or .nan passes a `> 0` check and breaks the run later."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found.extend(_float_settings(value, key + "."))
        elif isinstance(value, float):
            found.append((key, value))
    return found


def check_schedule(tr: TrainingConfig, source: str) -> None:
    """Warmup must end before training does: with warmup_epochs >= epochs the rate only ever rises (see
    optim.lr_lambda). Checked on the config a user writes and on a run's plan, not on a run's saved config.yaml,
    which must still load for scoring."""
    if tr.warmup_epochs >= tr.epochs:
        raise ConfigError(f"{source}: key 'training.warmup_epochs' must be less than training.epochs "
                          f"({tr.warmup_epochs:g} >= {tr.epochs}): the learning rate would never decay")


def _validate(cfg: Config, source: str) -> None:
    checks = [
        ("training.epochs", cfg.training.epochs >= 1, "at least 1"),
        ("training.batch_size", cfg.training.batch_size >= 1, "at least 1"),
        ("training.grad_accumulation", cfg.training.grad_accumulation >= 1, "at least 1"),
        ("training.learning_rate", cfg.training.learning_rate > 0, "positive"),
        ("training.evaluation_epochs", cfg.training.evaluation_epochs >= 1 and float(cfg.training.evaluation_epochs)
         .is_integer(), "a whole number of epochs, at least 1 (validation runs at an epoch's end)"),
        ("dataset.validation_size", 0 < cfg.dataset.validation_size < 1, "between 0 and 1"),
        ("dataset.data_sample", 0 < cfg.dataset.data_sample <= 1, "in (0, 1]"),
        ("dataset.label_columns", len(cfg.dataset.label_columns) >= 1, "a non-empty list"),
        ("audio.sample_rate", cfg.audio.sample_rate > 0, "positive"),
        ("audio.hop_size", cfg.audio.hop_size > 0, "positive"),
        ("audio.stft_window_size", cfg.audio.stft_window_size > 0, "positive"),
        ("audio.mel_frequency_bins", cfg.audio.mel_frequency_bins > 0, "positive"),
        ("audio.minimum_frequency", 0 <= cfg.audio.minimum_frequency < cfg.audio.maximum_frequency,
         "at least 0 and below audio.maximum_frequency"),
        ("audio.training_chunk_seconds", cfg.audio.training_chunk_seconds > 0, "positive"),
        ("prediction.probability_threshold", 0 <= cfg.prediction.probability_threshold <= 1, "in [0, 1]"),
        ("augmentation.mix_probability", 0 <= cfg.augmentation.mix_probability <= 1, "in [0, 1]"),
        ("environment.cpus_per_worker", cfg.environment.cpus_per_worker > 0, "positive"),
        ("environment.workers_per_fold", cfg.environment.workers_per_fold is None or cfg.environment.workers_per_fold >= 1,
         "at least 1 (or left out for one per GPU)"),
        ("architecture.dropout", 0 <= cfg.architecture.dropout < 1, "in [0, 1)"),
        ("augmentation.mix_concentration", cfg.augmentation.mix_concentration > 0, "positive"),
        ("augmentation.colouring_db", 0 <= cfg.augmentation.colouring_db <= 40, "in [0, 40] dB (0: off)"),
        ("augmentation.mix_iterations", cfg.augmentation.mix_iterations >= 1,
         "at least 1 (augmentation.mix_audio: Disabled turns mixing off)"),
        ("augmentation.time_mask_frames", cfg.augmentation.time_mask_frames >= 0, "at least 0 (0: off)"),
        ("augmentation.frequency_mask_bins", cfg.augmentation.frequency_mask_bins >= 0, "at least 0 (0: off)"),
        ("environment.number_of_workers", cfg.environment.number_of_workers >= 1, "at least 1"),
        ("environment.gpus_per_worker", cfg.environment.gpus_per_worker is None or cfg.environment.gpus_per_worker > 0,
         "positive (or left out for one GPU per worker; environment.device: cpu runs without GPUs)"),
        ("training.warmup_epochs", cfg.training.warmup_epochs >= 0, "at least 0"),
        ("training.weight_decay", cfg.training.weight_decay >= 0, "at least 0"),
        ("training.gradient_clip", cfg.training.gradient_clip >= 0, "at least 0 (0: no clipping)"),
        ("prediction.inference_chunk_seconds", cfg.prediction.inference_chunk_seconds > 0, "positive"),
        ("prediction.max_inference_chunk_seconds", cfg.prediction.max_inference_chunk_seconds > 0, "positive"),
        *_scoring_checks(cfg.scoring),
        *_logging_checks(cfg.logging),
        *_address_checks(cfg),
        ("dataset.folds", len(cfg.dataset.folds) >= 1, "a non-empty list of the folds to run"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"{source}: key '{key}' must be {what}")
    for key, value in _float_settings(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: key '{key}' must be a finite number, got {value}")
    if any(f < 0 for f in cfg.dataset.folds):
        raise ConfigError(f"{source}: key 'dataset.folds' must list fold numbers from 0")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", source)
    _validate(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.epochs=2` -> (["training", "epochs"], 2); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def shown_overrides(overrides: list[str]) -> list[str]:
    """Overrides as an error message may show them: a value that is a URI redacted (`redact_uri`), so that a
    refused credential is not printed."""
    shown = []
    for text in overrides:
        key, sep, value = text.partition("=")
        shown.append(f"{key}{sep}{redact_uri(value)}" if "://" in value else text)
    return shown


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1], 1):
            if node.get(part) is None:  # absent, or an empty section (`logging:` alone reads as None)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(path[:depth])}' is not a section")
        node[path[-1]] = value
    return data


class _RepeatedKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(f"key '{key}' appears twice (lines {first} and {second})")


def _mapping_paths(root: yaml.Node) -> dict[int, str]:
    """The dotted key path of every mapping node under `root` (by id), to name a repeated key in full."""
    paths: dict[int, str] = {}
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # an alias: the anchor's path names it
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            paths[id(node)] = path
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                stack.append((value_node, f"{path}.{name}" if path else name))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return paths


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated within one mapping, where yaml.safe_load silently keeps the
    last: a second `training:` block appended to a config would drop every setting of the first."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}
        self._checked: set[int] = set()

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths, self._checked = _mapping_paths(node), set()
        return super().construct_document(node)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Every mapping passes here before its `<<` merges are spliced in, so the check sees the keys as
        # written; a key that overrides a merged one is not a repeat.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_repeated_keys(node)
        super().flatten_mapping(node)

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        prefix = self._paths.get(id(node), "")
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _RepeatedKeyError(f"{prefix}.{key}" if prefix else str(key), lines[key], line)
            lines[key] = line


# YAML 1.1 (PyYAML) reads 1e-05 as a string; YAML 1.2 and every user read it as a number. Typed settings were
# converted anyway, but values of no fixed type (a search_space sampler's bounds) stayed text and were refused.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _YamlInt:
    value = _YamlInt(loader.construct_yaml_int(node))
    value.yaml_text = node.value
    return value


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _YamlFloat:
    value = _YamlFloat(loader.construct_yaml_float(node))
    value.yaml_text = node.value
    return value


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_config_yaml(text: str, source: str) -> dict[str, Any]:
    """A config's text as its mapping of sections, a repeated key refused: for a file, or a config.yaml read
    from storage (`source` names it in errors)."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except _RepeatedKeyError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return data


# A Markdown page's fenced YAML block: ```yaml (or ```yml) on a line of its own, to the next ``` line.
_YAML_FENCE = re.compile(r"^```[ \t]*ya?ml[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _markdown_yaml(text: str) -> str | None:
    """The YAML of a Markdown page that holds exactly one ```yaml block (a Hydrogen Torch catalog page holds its
    experiment config so), padded with blank lines so that error line numbers are the page's; else None."""
    blocks = list(_YAML_FENCE.finditer(text))
    if len(blocks) != 1:
        return None
    start = blocks[0].start(1)
    return "\n" * text.count("\n", 0, start) + blocks[0].group(1)


def read_config_data(path: str | Path) -> dict[str, Any]:
    """A config file's mapping: the file as YAML, or, where the file as a whole is not a YAML mapping, the one
    ```yaml block of a Markdown page (a catalog page as is)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        return parse_config_yaml(text, str(path))
    except ConfigError as exc:
        block = _markdown_yaml(text) if not isinstance(exc.__cause__, _RepeatedKeyError) else None
        if block is None:
            raise
    return parse_config_yaml(block, f"{path} (its ```yaml block)")


def config_with_overrides(data: dict[str, Any], where: str, overrides: list[str] | None) -> tuple[Config, str]:
    """A config's data (read from `where`) with `section.key=value` overrides applied, validated, and the source
    its errors name (the overrides shown redacted)."""
    try:
        apply_overrides(data, overrides or [])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    source = where + (f" (with overrides {', '.join(shown_overrides(overrides))})" if overrides else "")
    return config_from_dict(data, source), source


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a config file, apply `section.key=value` overrides, and validate the result."""
    cfg, source = config_with_overrides(read_config_data(path), str(path), overrides)
    check_dataset_sources(cfg.dataset, source)
    check_schedule(cfg.training, source)
    check_logger_installed(cfg.logging, source)
    return cfg
