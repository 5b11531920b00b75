"""The `gunsound` command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from gunsound import storage
from gunsound.config import Config, ConfigError, load_config
from gunsound.dataset import ManifestError
from gunsound.fingerprint import OutputMismatch
from gunsound.inputs import InputManifestError
from gunsound.lease import LeaseHeld

log = logging.getLogger("gunsound")

EXIT_OK = 0
EXIT_FAILED = 1  # the job failed while it ran (storage unreachable, a Ray task or Train run failed, ...)
EXIT_USAGE = 2  # bad arguments, config or input, found before the job's work starts (as argparse exits)
EXIT_ERROR_ROWS = 3  # score --strict: every file accounted for, but some rows are errors
EXIT_OUTPUT_MISMATCH = 4  # OUTPUT holds results made with other settings, data or model
EXIT_OUTPUT_BUSY = 5  # another job holds OUTPUT's lease

EXIT_CODES = """exit status:
  0  done (score: every input file accounted for, unreadable ones as error rows)
  1  the job failed while it ran
  2  bad arguments, config or input, found before the job's work starts
  3  score --strict: done, but some files' rows are errors
  4  refused: OUTPUT holds results made with other settings, data or model (--overwrite starts afresh)
  5  refused: another job is writing OUTPUT (it holds OUTPUT/lease.json)
a failure prints one line, "error: ..."; -v adds its traceback"""

PREDICT_EXIT_CODES = """exit status:
  0  done
  1  scoring the file failed
  2  bad arguments, config, MODEL or FILE (audio that cannot be read included)"""

EXPORT_EXIT_CODES = """exit status:
  0  done
  1  writing the pipeline failed
  2  bad arguments, config or RUN (a missing or unreadable model file included)"""

SYNTH_EXIT_CODES = """exit status:
  0  done
  1  writing the dataset failed (OUT not writable, disk full)
  2  bad arguments"""

# Messages that list what is wrong a line each (a manifest's bad rows, where a YAML file breaks): printed whole.
LISTING_ERRORS = (ConfigError, ManifestError, InputManifestError)


class BadInput(Exception):
    """Input found bad before the job's work started (exit 2); the check's own error is its __cause__."""


@contextlib.contextmanager
def checking(*also: type[BaseException]) -> Iterator[None]:
    """The checks a command makes before its job's work starts. A ValueError or an OSError there (a setting, a
    path, a file missing or not what it should be), or one of the `also` types, is bad input; a connection
    error or a timeout is not, as the same command may work a moment later."""
    try:
        yield
    except (ConnectionError, TimeoutError):
        raise
    except (ValueError, OSError, *also) as exc:
        raise BadInput(str(exc)) from exc


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (argparse names the flag in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def in_ray_job() -> bool:
    """Whether this process is a `ray job submit` entry point (Ray gives it RAY_JOB_CONFIG_JSON_ENV_VAR, and
    removes the RAY_JOB_ID that its own worker processes have) or runs in a Ray worker."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_ID"))


def check_job_output(output: str | None, name: str) -> None:
    """In a Ray job the working folder is Ray's temporary copy of the uploaded working dir
    (runtime_resources/working_dir_files/_ray_pkg_<hash>: a new one per upload, deleted once unused, on the
    disk of one node), so outputs that resolve there are lost: the job must name where they go."""
    if not in_ray_job():
        return
    why = (f"the job's working folder ({os.getcwd()}) is Ray's temporary copy of the uploaded working dir, "
           "deleted once unused and on one node's disk only; name an s3:// location or an absolute path")
    if output is None:
        raise ValueError(f"{name} is required in a Ray job (the default outputs/<experiment_name> would be "
                         f"lost): {why}")
    if storage.is_local(output) and not os.path.isabs(output):
        raise ValueError(f"{name} {output}: a relative path in a Ray job would be lost: {why}")


def check_output_folder(output: str) -> None:
    """OUTPUT is a folder or does not exist yet (S3 configured): a file there is a mistyped argument."""
    if storage.exists(output) and not storage.is_dir(output):
        raise FileExistsError(f"OUTPUT {output}: an existing file, not a folder")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `gunsound train` and `python -m ray_jobs.train`."""
    parser.add_argument("config", help="experiment YAML (Hydrogen Torch format)")
    parser.add_argument("--data", help="dataset location: folder, zip, dataframe or s3:// URI "
                                       "(default: the config's dataset paths)")
    parser.add_argument("--output", help="where outputs go, local or s3:// (default: outputs/<experiment_name>; "
                                         "required in a Ray job, whose working folder is Ray's temporary copy)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set training.epochs=2 (repeatable)")
    parser.add_argument("--drop-bad-rows", action="store_true",
                        help="drop rows that fail the dataset checks (they are listed) instead of stopping")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and the dataset, print the plan, and stop")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh: remove the earlier run's outputs in OUTPUT (gunsound's own files "
                             "only) instead of resuming it; a rerun with other settings or data needs it")


def run_output(args: argparse.Namespace, cfg: Config) -> str:
    """OUTPUT of train and tune, checked (S3 configured for it): --output, else outputs/<experiment_name>."""
    check_job_output(args.output, "--output")
    output = args.output or str(Path("outputs") / cfg.experiment_name)
    storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    check_output_folder(output)
    return output


def run_train(args: argparse.Namespace) -> int:
    from gunsound import training
    from gunsound.plan import prepare

    with checking():
        cfg = load_config(args.config, args.overrides)
        output = run_output(args, cfg)
        plan = prepare(cfg, args.data, output, drop_bad_rows=args.drop_bad_rows, overwrite=args.overwrite)
    print(plan.describe())
    if args.dry_run:
        print("\n--- resolved config ---\n" + plan.cfg.to_yaml())
        print("dry run: nothing trained")
        return 0
    results = training.run(plan, drop_bad_rows=args.drop_bad_rows, overwrite=args.overwrite)
    for fold, info in results["folds"].items():
        final = info["final"]
        print(f"fold {fold} (epoch {final.get('epoch', '?')}, the weights model.pt holds): "
              + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith("valid_") and isinstance(v, float)))
    print(f"outputs: {output}  (config.yaml, metrics.json, fold_<k>/model.pt)")
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--num-samples", type=int_at_least(1), default=8, help="trials to sample (default 8)")
    parser.add_argument("--then-train", action="store_true",
                        help="then train every fold of the split with the best config (the one split of a "
                             "validation_dataframe)")


def run_tune(args: argparse.Namespace) -> int:
    from gunsound import training, tuning
    from gunsound.plan import prepare

    with checking():
        cfg = load_config(args.config, args.overrides)
        output = run_output(args, cfg)
        plan = tuning.prepare_sweep(cfg, args.data, output, drop_bad_rows=args.drop_bad_rows,
                                    overwrite=args.overwrite)
        space = tuning.search_space(plan.cfg)
    print(plan.describe())
    print("search space: " + ", ".join(f"{k} {v}" for k, v in space.items()))
    if args.dry_run:
        print("dry run: nothing tuned")
        return 0
    result = tuning.run_tune(plan, args.num_samples, overwrite=args.overwrite)
    print(result.table.to_string(index=False))
    print(f"best: {result.best_params}")
    print(f"best config: {result.best_config_uri}")
    if args.then_train:
        final = prepare(result.best_config, args.data, storage.join(output, "best"), args.drop_bad_rows,
                        overwrite=args.overwrite)
        # Every fold of the split the sweep planned: with a validation dataframe that is its one split, fold 0
        # (the manifest holds no other fold, so any other would train with no validation clips).
        final.cfg.dataset.folds = list(final.split_folds)
        final.fold_ids = list(final.split_folds)
        results = training.run(final, drop_bad_rows=args.drop_bad_rows, overwrite=args.overwrite)
        cv = results["cv"]["mean_over_folds"]
        print("cross-validated: " + ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in cv.items()))
        print(f"outputs: {final.output}")
    return 0


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a training run (fold ensemble), a fold folder, or a model.pt")
    parser.add_argument("input", help="audio folder, s3:// prefix, manifest (.csv/.parquet with a path column) or file")
    parser.add_argument("output", help="where windows/, files/, events/ and summary.json go, local or s3://")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. --set prediction.inference_chunk_method=Sliding --set scoring.hop_seconds=0.5")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh: remove earlier scoring outputs in OUTPUT (files/, windows/, events/, "
                             "summary.json) instead of resuming; a rerun with another model or settings needs it")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {EXIT_ERROR_ROWS} when any file's row is an error (default: exit 0 once every "
                             "file is accounted for)")
    parser.add_argument("--allow-outside", action="store_true",
                        help="a manifest INPUT may name files outside its own folder (absolute paths, ../, other "
                             "buckets); by default such rows are errors naming the row")


def check_score_input(location: str, allow_outside: bool) -> None:
    """INPUT exists and, a folder, prefix, zip or file, holds an audio file (listed up to the first one). A
    manifest is read once, by the job, which checks its rows (InputManifestError)."""
    from gunsound.inputs import open_inputs

    location = storage.absolute(location)
    if location.lower().endswith((".csv", ".pq", ".parquet")):
        if not storage.exists(location):
            raise FileNotFoundError(f"input {location} does not exist")
        return
    listing = open_inputs(location, allow_outside=allow_outside)
    if not any(not reason for page in listing.pages for _, reason in page):
        raise FileNotFoundError(f"input {location}: no audio files found")


def check_score_args(args: argparse.Namespace, cfg: Config) -> None:
    """What `score` is given, checked before the job claims OUTPUT or starts Ray: OUTPUT, every model file
    (a run's ensemble.json may name a fold that is missing), INPUT."""
    from gunsound.model_files import describe_model, model_files

    check_job_output(args.output, "OUTPUT")
    storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    check_output_folder(storage.absolute(args.output))
    describe_model(model_files(args.model))  # read without torch, as the job's driver does
    check_score_input(args.input, args.allow_outside)


def run_score(args: argparse.Namespace) -> int:
    from gunsound import scoring

    with checking():
        cfg = scoring.scoring_config(args.model, args.overrides)
        check_score_args(args, cfg)
    summary = scoring.score(args.model, args.input, args.output, cfg, overwrite=args.overwrite,
                            allow_outside=args.allow_outside)
    print(summary.describe())
    return EXIT_ERROR_ROWS if args.strict and summary.errors else EXIT_OK


def run_predict(args: argparse.Namespace) -> int:
    from gunsound import audio, scoring
    from gunsound.decode import AudioError
    from gunsound.inference import load_scoring_model

    with checking(AudioError):  # an unreadable FILE is bad input, as a missing one is
        cfg = scoring.scoring_config(args.model, args.overrides)
        audio.info(args.file)  # before the model loads: a FILE that is no audio is refused in a moment
        model = load_scoring_model(args.model)
    row, events, windows = scoring.predict_file(model, args.file, cfg)
    if row["status"] != "ok":  # its header was read, but its audio cannot be decoded
        print(f"error: {args.file}: {row['error']}", file=sys.stderr)
        return EXIT_USAGE
    ranked = sorted(((row[f"max_{c}"], c) for c in model.classes), reverse=True)
    print(f"{args.file}: {row['duration']:.1f} s, {row['windows']} windows, top class {row['top_class']}")
    for p, c in ranked[: args.top]:
        print(f"  {c:<20} max {p:.3f}  mean {row[f'mean_{c}']:.3f}")
    print(f"{len(events)} shots")
    for e in events:
        rpm = "" if e["rounds_per_minute"] != e["rounds_per_minute"] else f", {e['rounds_per_minute']:.0f} rpm"
        print(f"  {e['time']:8.3f} s  {e['class']:<20} {e['probability']:.2f}  burst {e['burst']}"
              f" ({e['shots_in_burst']} shots{rpm})")
    if args.png:
        from gunsound.report import plot_timeline

        plot_timeline(args.file, windows, events, model.classes, model.features, cfg.prediction.probability_threshold,
                      args.png)
        print(f"timeline: {args.png}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from gunsound.export import export_pipeline
    from gunsound.model_files import describe_model, model_files

    with checking():  # every model file there and readable (a bad setting is a ConfigError: exit 2 as well)
        describe_model(model_files(args.run))
    spec = export_pipeline(args.run, args.out, args.overrides)
    print(f"exported {len(spec['models'])} model(s), {len(spec['classes'])} classes, "
          f"{spec['scoring']['window_seconds']:g} s windows to {args.out}: model.pt2, pipeline.json, score.py "
          "(with windows.py, onsets.py, events.py, decode.py)")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from gunsound.synthesis import generate_dataset

    df = generate_dataset(args.out, clips_per_class=args.clips_per_class, background=args.background, seed=args.seed)
    print(f"wrote {len(df)} clips ({df['class'].nunique()} labels) to {args.out}: train.pq, Gun_Classifier/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gunsound", description="Gun type classification from gunshot audio")
    add_verbose_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the folds of an experiment on Ray", epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(train)
    train.set_defaults(func=run_train)

    tune = sub.add_parser("tune", help="sweep learning rate, epochs and search_space with Ray Tune (ASHA)",
                          epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(tune)
    tune.set_defaults(func=run_tune)

    score = sub.add_parser("score", help="score an audio archive with a trained model (Ray batch job)",
                           epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_score_arguments(score)
    score.set_defaults(func=run_score)

    predict = sub.add_parser("predict", help="top classes and shots of one file, without Ray",
                             epilog=PREDICT_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("model")
    predict.add_argument("file")
    predict.add_argument("--top", type=int_at_least(1), default=3, help="classes to list (default 3)")
    predict.add_argument("--png", help="write a timeline (waveform, spectrogram, shots, probabilities)")
    predict.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    predict.set_defaults(func=run_predict)

    export = sub.add_parser("export", help="write a self-contained scoring pipeline (torch.export program + score.py and its modules)",
                            epilog=EXPORT_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run", help="a training run (fold ensemble), a fold folder, or a model.pt")
    export.add_argument("out", help="output folder, local or s3://")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    export.set_defaults(func=run_export)

    synth = sub.add_parser("synth", help="write a synthetic gunshot dataset (Hydrogen Torch layout)",
                           epilog=SYNTH_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("out", help="output folder")
    synth.add_argument("--clips-per-class", type=int_at_least(1), default=95)
    synth.add_argument("--background", type=int_at_least(0), default=0, help="clips with no gunshot")
    synth.add_argument("--seed", type=int_at_least(0), default=0)
    synth.set_defaults(func=run_synth)
    return parser


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and a failure's traceback after its one-line error")


def job_parser(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The parser of a `python -m ray_jobs.<command>` entry point: the command's arguments, -v, its exit codes."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_argument(parser)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is emitted, not as it was when logging was set up: a caller
    that runs main() in its own process (a notebook, a test) may swap and close its stderr in between."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Log records to stderr (once per process; a caller's own logging setup is kept)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[_StderrHandler()],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def from_ray(exc: BaseException) -> bool:
    """Raised by Ray: a task's or a Train run's error raised again in the driver, or Ray's own."""
    return any((c.__module__ or "").split(".")[0] == "ray" for c in type(exc).__mro__)


def _ray_cause(exc: BaseException) -> tuple[str, BaseException] | None:
    """Where in the job an error that Ray raised again came from, and the error itself; None for others."""
    if not from_ray(exc):
        return None
    if isinstance(getattr(exc, "cause", None), BaseException):  # RayTaskError (Ray Data, a fold's task)
        return f"in {getattr(exc, 'function_name', 'a Ray task')}: ", exc.cause
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        return f"in Train worker {rank}: ", failures[rank]
    if isinstance(getattr(exc, "controller_failure", None), BaseException):  # Ray Train's ControllerError
        return "in Ray Train's controller: ", exc.controller_failure
    if exc.__cause__ is not None:  # e.g. Ray Train's TrainingFailedError, raised from the worker's error
        return f"{type(exc).__name__}: ", exc.__cause__
    return None


def error_message(exc: BaseException) -> str:
    """What a failed command prints after "error: ": an error of a Ray task or Train worker by its cause (Ray's
    own message holds the remote traceback), with its type where the message alone may not say what failed
    (a KeyError, a botocore error, an error from a task); one line, but for listings of what is wrong."""
    if isinstance(exc, BadInput) and exc.__cause__ is not None:
        exc = exc.__cause__
    where, remote = "", False
    while (found := _ray_cause(exc)) is not None:
        where, exc, remote = where + found[0], found[1], True
    text = str(exc) if isinstance(exc, LISTING_ERRORS) else " ".join(str(exc).split())
    if not text:
        return where + type(exc).__name__
    if remote or from_ray(exc) or not isinstance(exc, ValueError | OSError | RuntimeError):
        text = f"{type(exc).__name__}: {text}"
    return where + text


def exit_code(exc: Exception) -> int:
    """Bad input (2) when a check refused the job before its work started: a check of the command's own, or one
    of gunsound's checks inside the job's call (they raise ValueErrors of their own: ConfigError, ManifestError,
    InputManifestError, ResourceError, PretrainedWeightsFileError); otherwise the job failed while it ran (1),
    whatever the type, as an error a Ray task raises again in the driver is one of a job under way."""
    if isinstance(exc, BadInput):
        return EXIT_USAGE
    if isinstance(exc, ValueError) and type(exc).__module__.startswith("gunsound.") and not from_ray(exc):
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose)
    try:
        return args.func(args)
    except OutputMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT_MISMATCH
    except LeaseHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT_BUSY
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line and its exit status
        if verbose:
            traceback.print_exception(exc)
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
