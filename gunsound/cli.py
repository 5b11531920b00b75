"""The `gunsound` command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gunsound import storage
from gunsound.config import ConfigError, load_config
from gunsound.dataset import ManifestError
from gunsound.fingerprint import OutputMismatch
from gunsound.lease import LeaseHeld

log = logging.getLogger("gunsound")

EXIT_OK = 0
EXIT_FAILED = 1  # the job failed (an error while it ran, e.g. storage unreachable, a shard lost windows)
EXIT_USAGE = 2  # bad arguments, config or input (as argparse exits)
EXIT_ERROR_ROWS = 3  # score --strict: every file accounted for, but some rows are errors
EXIT_OUTPUT_MISMATCH = 4  # OUTPUT holds results made with other settings, data or model
EXIT_OUTPUT_BUSY = 5  # another job holds OUTPUT's lease

EXIT_CODES = """exit status:
  0  done (score: every input file accounted for, unreadable ones as error rows)
  1  the job failed
  2  bad arguments, config or input
  3  score --strict: done, but some files' rows are errors
  4  refused: OUTPUT holds results made with other settings, data or model (--overwrite starts afresh)
  5  refused: another job is writing OUTPUT (it holds OUTPUT/lease.json)"""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `gunsound train` and `python -m ray_jobs.train`."""
    parser.add_argument("config", help="experiment YAML (Hydrogen Torch format)")
    parser.add_argument("--data", help="dataset location: folder, zip, dataframe or s3:// URI "
                                       "(default: the config's dataset paths)")
    parser.add_argument("--output", help="where outputs go, local or s3:// (default: outputs/<experiment_name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set training.epochs=2 (repeatable)")
    parser.add_argument("--drop-bad-rows", action="store_true",
                        help="drop rows that fail the dataset checks (they are listed) instead of stopping")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and the dataset, print the plan, and stop")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh: remove the earlier run's outputs in OUTPUT (gunsound's own files "
                             "only) instead of resuming it; a rerun with other settings or data needs it")


def run_train(args: argparse.Namespace) -> int:
    from gunsound import training
    from gunsound.plan import prepare

    cfg = load_config(args.config, args.overrides)
    output = args.output or str(Path("outputs") / cfg.experiment_name)
    plan = prepare(cfg, args.data, output, drop_bad_rows=args.drop_bad_rows, overwrite=args.overwrite)
    print(plan.describe())
    if args.dry_run:
        print("\n--- resolved config ---\n" + plan.cfg.to_yaml())
        print("dry run: nothing trained")
        return 0
    results = training.run(plan, drop_bad_rows=args.drop_bad_rows, overwrite=args.overwrite)
    for fold, info in results["folds"].items():
        final = info["final"]
        print(f"fold {fold}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()
                                           if k.startswith("valid_") and isinstance(v, float)))
    print(f"outputs: {output}  (config.yaml, metrics.json, fold_<k>/model.pt)")
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=8, help="trials to sample (default 8)")
    parser.add_argument("--then-train", action="store_true", help="then train every fold with the best config")


def run_tune(args: argparse.Namespace) -> int:
    from gunsound import training, tuning
    from gunsound.dataset import num_folds
    from gunsound.plan import prepare

    cfg = load_config(args.config, args.overrides)
    output = args.output or str(Path("outputs") / cfg.experiment_name)
    plan = tuning.prepare_sweep(cfg, args.data, output, drop_bad_rows=args.drop_bad_rows, overwrite=args.overwrite)
    print(plan.describe())
    print("search space: " + ", ".join(f"{k} {v}" for k, v in tuning.search_space(plan.cfg).items()))
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
        final.cfg.dataset.folds = list(range(num_folds(final.cfg.dataset)))
        final.fold_ids = final.cfg.dataset.folds
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


def run_score(args: argparse.Namespace) -> int:
    from gunsound import scoring

    cfg = scoring.scoring_config(args.model, args.overrides)
    summary = scoring.score(args.model, args.input, args.output, cfg, overwrite=args.overwrite,
                            allow_outside=args.allow_outside)
    print(summary.describe())
    return EXIT_ERROR_ROWS if args.strict and summary.errors else EXIT_OK


def run_predict(args: argparse.Namespace) -> int:
    from gunsound import scoring
    from gunsound.inference import load_scoring_model

    cfg = scoring.scoring_config(args.model, args.overrides)
    model = load_scoring_model(args.model)
    row, events, windows = scoring.predict_file(model, args.file, cfg)
    if row["status"] != "ok":
        print(f"{args.file}: {row['error']}", file=sys.stderr)
        return 1
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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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

    predict = sub.add_parser("predict", help="top classes and shots of one file, without Ray")
    predict.add_argument("model")
    predict.add_argument("file")
    predict.add_argument("--top", type=int, default=3)
    predict.add_argument("--png", help="write a timeline (waveform, spectrogram, shots, probabilities)")
    predict.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    predict.set_defaults(func=run_predict)

    export = sub.add_parser("export", help="write a self-contained scoring pipeline (torch.export program + score.py and its modules)")
    export.add_argument("run", help="a training run (fold ensemble), a fold folder, or a model.pt")
    export.add_argument("out", help="output folder, local or s3://")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    export.set_defaults(func=run_export)

    synth = sub.add_parser("synth", help="write a synthetic gunshot dataset (Hydrogen Torch layout)")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--clips-per-class", type=int, default=95)
    synth.add_argument("--background", type=int, default=0, help="clips with no gunshot")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=run_synth)
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


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except OutputMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT_MISMATCH
    except LeaseHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT_BUSY
    except (ConfigError, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
