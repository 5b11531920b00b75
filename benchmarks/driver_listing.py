"""What the scoring driver holds for a listing of N files, and how long it takes from listing to dataset.

The listing is generated in pages of 1,000 keys, as S3 returns them (no store is listed: this measures the
driver, not S3). It is cut into shards by `scoring._list_shards`, which keeps the first shards and puts every
later one into Ray's object store as it is made, and handed to Ray Data (`from_arrow_refs`). The baseline,
measured in the same run, is what the driver did before: the whole listing as a list of paths, cut into
shards and units, handed over with `from_items`. Python heap by tracemalloc (which slows both), times
without it.

    python benchmarks/driver_listing.py [--files 1000000]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import ray

from gunsound import scoring

SHARD_FILES = 256
PAGE = 1000


def pages(files: int):
    for start in range(0, files, PAGE):
        yield [(f"s3://archive-bucket/sensors/site{i // 5000:04d}/2026-11-{i % 28 + 1:02d}/clip{i:09d}.wav", "")
               for i in range(start, min(files, start + PAGE))]


def whole_list(files: int) -> list:
    """The baseline: every path held, cut into shards and planning units."""
    paths = [uri for page in pages(files) for uri, reason in page if not reason]
    shards = [paths[i:i + SHARD_FILES] for i in range(0, len(paths), SHARD_FILES)]
    return [{"shard": k, "part": 0, "parts": 1, "paths": p, "headers": ""} for k, p in enumerate(shards)]


def streamed(files: int) -> scoring._Listed:
    return scoring._list_shards(pages(files), done=set(), retry=set(), shard_files=SHARD_FILES, hold=2,
                                skipped=lambda entries, page: None)


def measure(files: int, traced: bool) -> dict:
    out = {}
    for name, cut in (("whole list (baseline)", whole_list), ("_list_shards", streamed)):
        if traced:
            tracemalloc.start()
        started = time.perf_counter()
        held = cut(files)
        listed_s = time.perf_counter() - started
        heap = tracemalloc.get_traced_memory()[0] if traced else 0
        started = time.perf_counter()
        ds = ray.data.from_items(held, override_num_blocks=min(len(held), 20_000)) if isinstance(held, list) \
            else ray.data.from_arrow_refs(held.blocks)
        out[name] = {"heap": heap, "listed_s": listed_s, "dataset_s": time.perf_counter() - started,
                     "blocks": ds.num_blocks()}
        if traced:
            tracemalloc.stop()
        del held, ds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
    timed, traced = measure(args.files, traced=False), measure(args.files, traced=True)
    for name in timed:
        t, m = timed[name], traced[name]
        print(f"{name:<22} {args.files} files, {t['blocks']} blocks: driver heap {m['heap'] / 2**20:7.2f} MiB "
              f"({m['heap'] / args.files:6.1f} B a file); listing to shards {t['listed_s']:5.1f} s, to dataset "
              f"{t['dataset_s']:5.1f} s")


if __name__ == "__main__":
    main()
