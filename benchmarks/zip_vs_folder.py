"""Reading a zipped dataset in place against the same clips in a folder: decode (read, mono, resample to the
training rate) of every clip, one process, interleaved runs. No target: it prices what reading in place costs.

    python benchmarks/zip_vs_folder.py [--clips-per-class 95] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
import zipfile

import pandas as pd
from memory import scratch_dir

from gunsound import audio, storage
from gunsound.synthesis import generate_dataset


def zip_folder(folder, archive, compression) -> None:
    with zipfile.ZipFile(archive, "w", compression=compression) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = scratch_dir(args.workdir, "gunsound-zip-bench-")
    data = work / "data"
    if not (data / "train.pq").exists():
        generate_dataset(data, clips_per_class=args.clips_per_class, seed=0)
    rel = ["Gun_Classifier/" + p for p in pd.read_parquet(data / "train.pq")["image"]]
    sources = {"folder": [str(data / r) for r in rel]}
    for name, compression in (("zip, stored", zipfile.ZIP_STORED), ("zip, deflated", zipfile.ZIP_DEFLATED)):
        archive = work / f"{name.split()[-1]}.zip"
        if not archive.exists():
            zip_folder(data, archive, compression)
        sources[name] = [storage.zip_location(str(archive), r) for r in rel]
    times: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(args.repeats):
        for name, paths in sources.items():
            start = time.perf_counter()
            for p in paths:
                audio.read(p, 32000)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["folder"])
    print(f"{len(rel)} clips, {args.repeats} interleaved runs, median:")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"  {name:<14} {m:6.2f} s  {len(rel) / m:7.1f} clips/s  {m / base:5.2f}x the folder's time")


if __name__ == "__main__":
    main()
