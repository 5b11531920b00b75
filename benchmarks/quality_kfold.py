"""Five-fold cross-validated quality on the synthetic default dataset with configs/laptop.yaml.

Target: macro ROC AUC >= 0.99 and accuracy >= 95% on 2 CPU cores in a few minutes.

    python benchmarks/quality_kfold.py [--clips-per-class 95] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from memory import scratch_dir

from gunsound import training
from gunsound.config import load_config
from gunsound.plan import prepare
from gunsound.synthesis import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=95)
    parser.add_argument("--background", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = scratch_dir(args.workdir, "gunsound-quality-")
    data = work / "data"
    if not (data / "train.pq").exists():
        generate_dataset(data, clips_per_class=args.clips_per_class, background=args.background, seed=0)
    cfg = load_config(ROOT / "configs" / "laptop.yaml", ["dataset.folds=[0, 1, 2, 3, 4]", *args.overrides])
    start = time.perf_counter()
    plan = prepare(cfg, str(data), str(work / f"run-{int(time.time())}"))
    results = training.run(plan)
    wall = time.perf_counter() - start
    cv = results["cv"]
    print(f"{len(plan.manifest.frame)} clips, {len(plan.manifest.classes)} classes, folds {plan.fold_ids}, "
          f"backbone {cfg.architecture.backbone}, {cfg.training.epochs} epochs, wall {wall:.0f} s")
    for name, s in cv["mean_over_folds"].items():
        print(f"  {name:<10} mean {s['mean']:.4f}  std {s['std']:.4f}  min {s['min']:.4f}  max {s['max']:.4f}")
    auc, acc = cv["mean_over_folds"]["roc_auc"]["mean"], cv["mean_over_folds"]["accuracy"]["mean"]
    print(f"target ROC AUC >= 0.99: {'met' if auc >= 0.99 else 'NOT met'} ({auc:.4f}); "
          f"accuracy >= 0.95: {'met' if acc >= 0.95 else 'NOT met'} ({acc:.4f})")
    if args.workdir:
        print(f"outputs: {plan.output} (report.html)")
    else:
        print("outputs: removed with the temporary folder; pass --workdir DIR to keep them (report.html)")


if __name__ == "__main__":
    main()
