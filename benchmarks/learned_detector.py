"""Would a learned shot detector beat the energy detector on real recordings? Issue 10 asks to choose between
the two by `shots_real.py`'s figures; this measures the learned route on the same corpus, folds grouped by
package, against `onsets.find_shots` on the same archives.

The learned detector: `find_shots` with a low threshold (`--candidates-db`, 6 dB: it finds nearly every shot,
and two to three times as many other things), then a classifier over each candidate's 32-band log-mel patch
(20 ms before to 280 ms after, over the noise floor, in 20 ms steps; the 100 ms before; the band-averaged
profile; the blast's spectral shape) that keeps the candidates it calls shots. It is trained on mixtures of
the training packages' gun clips (every shot: the manifest's onsets, else `find_shots` on the clean clip, else one at its start)
and non-gun sounds over their ambient beds at 5-30 dB, and tested on mixed archives of the held-out
packages' single shots, beds and non-gun sounds, built as `shots_real.py` builds them. One fold per package
that holds single shots; the other packages are dealt round the folds.

    python benchmarks/learned_detector.py /work/corpus [--classifier boosting|logistic] [--ungrouped]

`--ungrouped` trains every fold on all the packages, the held-out ones included: the same pipeline when it
has heard the test packages' sound designers, to tell a classifier that cannot learn from one that does not
carry to another game's sounds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from shots_real import (
    SAMPLE_RATE,
    TOLERANCE,
    Clip,
    ambient_bed,
    corpus_clips,
    is_stationary,
    match,
    mixed_archive,
    shot_energy,
)
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gunsound.onsets import FRAME_SECONDS, decimate, find_shots, log_mel, noise_floor

BEFORE, AFTER, POOL, CONTEXT = 4, 56, 4, 20  # frames of 5 ms
THRESHOLDS = (0.3, 0.5, 0.7)


def load_clips(root: Path) -> list[tuple[Clip, str, list[float]]]:
    """Every corpus clip with its role (single, gun, bed, other) and, for gun clips, its shots' times."""
    clips = []
    for row, clip, onsets in corpus_clips(root):
        wave = clip.wave
        if row.label == "background":
            clips.append((clip, "bed" if is_stationary(wave) else "other", []))
            continue
        if row.rounds == "1" and onsets:
            clip.onset = onsets[0]
        # A gun clip holds at least one shot: a sample too short for find_shots' floor (80 ms) is one shot.
        shots = onsets or list(find_shots(wave, SAMPLE_RATE)) or [0.0]
        clips.append((clip, "single" if row.rounds == "1" else "gun", shots))
    return clips


def candidate_features(wave: np.ndarray, times: np.ndarray) -> np.ndarray:
    """One row per candidate time: its log-mel patch over the noise floor and what led up to it."""
    decimated, rate = decimate(wave, SAMPLE_RATE)
    level = log_mel(decimated, rate).astype(np.float64)
    over = level - noise_floor(level, int(round(1 / FRAME_SECONDS)))
    padded = np.pad(over, ((BEFORE + CONTEXT, AFTER), (0, 0)))
    rows = []
    for t in times:
        at = int(round(t / FRAME_SECONDS)) + BEFORE + CONTEXT
        patch = padded[at - BEFORE:at + AFTER]
        blast = patch[BEFORE:BEFORE + 10].mean(axis=0)
        rows.append(np.concatenate([patch.reshape(-1, POOL, patch.shape[1]).mean(axis=1).ravel(),
                                    padded[at - BEFORE - CONTEXT:at - BEFORE].mean(axis=0),
                                    patch.mean(axis=1), blast - blast.mean()]))
    return np.array(rows).reshape(len(times), -1)


def gun_archive(guns: list[tuple[Clip, list[float]]], beds: list[Clip], others: list[Clip], snr_db: float,
                rng: np.random.Generator, seconds: float = 60.0) -> tuple[np.ndarray, list[float]]:
    """A training archive: gun clips (every one of their shots true) every 2-4 s past their length over a
    bed, with a non-gun sound between most pairs."""
    n = int(seconds * SAMPLE_RATE)
    wave = 0.02 * ambient_bed(n, beds, rng)
    truth: list[float] = []
    t = float(rng.uniform(0.3, 1.0))
    while t < seconds - 2.0:
        clip, shots = guns[rng.integers(len(guns))]
        at = int((t - clip.onset) * SAMPLE_RATE)
        piece = clip.wave[max(0, -at):][: n - max(at, 0)]
        wave[max(at, 0):max(at, 0) + len(piece)] += np.sqrt(0.02**2 * 10 ** (snr_db / 10) / shot_energy(clip)) * piece
        truth += [t - clip.onset + s for s in shots]
        gap = float(rng.uniform(2.0, 4.0)) + 0.5 * len(clip.wave) / SAMPLE_RATE
        if others and rng.random() < 0.6 and (start := int((t + gap / 2) * SAMPLE_RATE)) < n:
            other = others[rng.integers(len(others))].wave
            piece = other[: min(len(other), int((gap / 2 - 0.3) * SAMPLE_RATE))][: n - start]
            wave[start:start + len(piece)] += 0.02 * 10 ** (rng.uniform(0, 30) / 20) / (other.std() + 1e-12) * piece
        t += gap
    return np.clip(wave, -1, 1).astype(np.float32), truth


def train(clips: list[tuple[Clip, str, list[float]]], *, candidates_db: float, classifier: str, seed: int):
    role = lambda *names: [c for c, r, _ in clips if r in names]  # noqa: E731
    guns = [(c, shots) for c, r, shots in clips if r in ("single", "gun")]
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for snr in (5, 10, 15, 20, 30):
        for _ in range(3):
            wave, truth = gun_archive(guns, role("bed"), role("other"), snr, rng)
            found = find_shots(wave, SAMPLE_RATE, threshold_db=candidates_db)
            if len(found):
                features.append(candidate_features(wave, found))
                labels.append(np.min(np.abs(np.subtract.outer(found, truth)), axis=1) <= TOLERANCE)
    model = (HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)
             if classifier == "boosting" else make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)))
    return model.fit(np.concatenate(features), np.concatenate(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="the folder benchmarks/real_corpus.py built")
    parser.add_argument("--classifier", choices=("boosting", "logistic"), default="boosting")
    parser.add_argument("--candidates-db", type=float, default=6.0, help="find_shots' threshold for candidates")
    parser.add_argument("--archives", type=int, default=3, help="test archives per fold and signal-to-noise ratio")
    parser.add_argument("--ungrouped", action="store_true", help="train on the held-out packages too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    clips = load_clips(args.corpus)
    holders = sorted({c.package for c, r, _ in clips if r == "single"})
    rest = sorted({c.package for c, _, _ in clips} - set(holders))
    fold_of = {p: k for k, p in enumerate(holders)} | {p: k % len(holders) for k, p in enumerate(rest)}
    print(f"{len(clips)} clips, {len(holders)} folds (held out with: {', '.join(holders)})")
    rows = []
    for fold in range(len(holders)):
        held = [(c, r, s) for c, r, s in clips if fold_of[c.package] == fold]
        model = train(clips if args.ungrouped else [x for x in clips if fold_of[x[0].package] != fold],
                      candidates_db=args.candidates_db, classifier=args.classifier, seed=args.seed + fold)
        role = lambda *names, held=held: [c for c, r, _ in held if r in names]  # noqa: E731
        rng = np.random.default_rng([args.seed, fold])
        is_shot, shot_score = [], []
        for snr in (10, 20, 30):
            for _ in range(args.archives):
                wave, truth, others = mixed_archive(role("single"), role("bed"), role("other"), snr, 60.0, rng)
                found = find_shots(wave, SAMPLE_RATE, threshold_db=args.candidates_db)
                shot = model.predict_proba(candidate_features(wave, found))[:, 1] if len(found) else np.zeros(0)
                is_shot.append(np.min(np.abs(np.subtract.outer(found, truth)), axis=1) <= TOLERANCE)
                shot_score.append(shot)
                detectors = {"scorer (find_shots)": find_shots(wave, SAMPLE_RATE),
                             f"candidates ({args.candidates_db:g} dB)": found}
                detectors |= {f"learned, p >= {p}": found[shot >= p] for p in THRESHOLDS}
                for name, times in detectors.items():
                    outside = ~np.any([(times >= lo - TOLERANCE) & (times <= hi) for lo, hi in others] or
                                      [np.zeros(len(times), dtype=bool)], axis=0)
                    rows.append({"detector": name, "snr": snr, "hits": match(times, truth),
                                 "found": int(outside.sum()), "found_all": len(times), "shots": len(truth)})
        is_shot, shot_score = np.concatenate(is_shot), np.concatenate(shot_score)
        print(f"fold {fold} ({holders[fold]}): {is_shot.sum()} of {len(is_shot)} candidates are shots, "
              f"ROC AUC of the classifier's score over them {roc_auc_score(is_shot, shot_score):.3f}")
    table = pd.DataFrame(rows)
    for by in (["detector", "snr"], ["detector"]):
        sums = table.groupby(by, sort=False)[["hits", "found", "found_all", "shots"]].sum()
        sums["recall"], sums["precision"] = sums.hits / sums.shots, sums.hits / sums.found.clip(lower=1)
        # Over every detection, those on non-gun sounds included (which `precision` leaves to the classifier).
        sums["precision, all"] = sums.hits / sums.found_all.clip(lower=1)
        print(sums.round(3).to_string(), "\n")
    print(f"classifier {args.classifier}, {'ungrouped' if args.ungrouped else 'folds grouped by package'}; "
          f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
