"""Does the generator teach what real guns sound like? Trains the `make demo` model on `gunsound synth` output only
(configs/laptop.yaml, one fold) and scores every clip of the real corpus (benchmarks/real_corpus.py) with it:
gun-vs-not ROC AUC from the file's highest window probability of any gun class (issue 10 asks >= 0.85).

    python benchmarks/zero_shot.py /work/corpus                      # synth + train + score, the demo's sizes
    python benchmarks/zero_shot.py /work/corpus --clips-per-class 60 --background 60 --workdir /tmp/zs
    python benchmarks/zero_shot.py /work/corpus --run outputs/demo   # only score an existing run

Prints the synth time, the training time per epoch and the synthetic validation ROC AUC (so a generator that
buys real-sound transfer with a worse synthetic figure shows it), then the zero-shot figures. The model is
loaded once and each file is cut into consecutive windows of the training chunk, the last one zero-padded,
as `prediction.inference_chunk_method: Fix` scores them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from memory import scratch_dir
from sklearn.metrics import roc_auc_score

from gunsound import audio, synthesis, training
from gunsound.config import load_config
from gunsound.inference import WindowScorer, load_scoring_model
from gunsound.plan import prepare

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "laptop.yaml"


def windows(wave: np.ndarray, length: int) -> np.ndarray:
    """Consecutive windows of `length` samples covering the whole wave; the last one zero-padded."""
    count = max(1, -(-len(wave) // length))
    return np.stack([audio.fit_length(wave[i * length:(i + 1) * length], length) for i in range(count)])


def gun_scores(run: str, paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each file's highest window probability of any class of the run (all its classes are guns)."""
    model = load_scoring_model(run)
    scorer = WindowScorer(model, mixed_precision=False)
    length = int(round(model.chunk_seconds * model.features.sample_rate))
    best = []
    for path in paths:
        wave, _ = audio.read(path, model.features.sample_rate)
        probs = scorer({"wave": windows(wave.astype(np.float32), length)})["probs"]
        best.append(float(probs.max()))
    return np.array(best), model.classes


def zero_shot(run: str, corpus: Path) -> dict[str, float]:
    table = pd.read_csv(corpus / "corpus.csv", keep_default_na=False, dtype=str)
    started = time.perf_counter()
    score, _ = gun_scores(run, [str(corpus / f) for f in table["file"]])
    is_gun = (table["label"] != "background").to_numpy()
    return {"zero-shot AUC": roc_auc_score(is_gun, score), "median gun score, gun clips": float(np.median(score[is_gun])),
            "median gun score, background": float(np.median(score[~is_gun])), "clips": len(table),
            "gun clips": int(is_gun.sum()), "score s": time.perf_counter() - started}


def train_on_synth(work: Path, clips_per_class: int, background: int, seed: int, config: str,
                   overrides: list[str]) -> tuple[str, dict[str, float]]:
    """Generate the synthetic set, train on it; returns the run and its timing and validation figures."""
    data = work / "synthetic"
    started = time.perf_counter()
    synthesis.generate_dataset(data, clips_per_class=clips_per_class, background=background, seed=seed)
    synth_seconds = time.perf_counter() - started
    cfg = load_config(config, overrides)
    run = str(work / f"run-{int(time.time())}")
    started = time.perf_counter()
    plan = prepare(cfg, str(data), run)
    training.run(plan)
    train_seconds = time.perf_counter() - started
    fold = json.loads((Path(run) / "metrics.json").read_text())["folds"][str(plan.fold_ids[0])]
    return run, {"synth s": synth_seconds, "train s": train_seconds,
                 "epoch s (median)": float(np.median([e["epoch_seconds"] for e in fold["epochs"]])),
                 "synthetic valid ROC AUC": fold["final"]["valid_roc_auc"],
                 "synthetic valid accuracy": fold["final"]["valid_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", help="the folder benchmarks/real_corpus.py built")
    parser.add_argument("--run", help="score this trained run instead of training one")
    parser.add_argument("--clips-per-class", type=int, default=60)
    parser.add_argument("--background", type=int, default=180)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    figures: dict[str, float] = {}
    run = args.run
    if run is None:
        work = scratch_dir(args.workdir, "gunsound-zero-shot-")
        run, figures = train_on_synth(work, args.clips_per_class, args.background, args.seed, args.config,
                                      args.overrides)
    figures |= zero_shot(run, Path(args.corpus))
    print(f"zero-shot on {args.corpus}: model {run}"
          + ("" if args.run else f" (synth --clips-per-class {args.clips_per_class} --background {args.background}"
                                 f" --seed {args.seed}, {Path(args.config).name})"))
    for key, value in figures.items():
        print(f"  {key:32s} {value:.3f}" if isinstance(value, float) else f"  {key:32s} {value}")
    auc = figures["zero-shot AUC"]
    print(f"target zero-shot AUC >= 0.85: {'met' if auc >= 0.85 else 'NOT met'} ({auc:.3f})")


if __name__ == "__main__":
    main()
