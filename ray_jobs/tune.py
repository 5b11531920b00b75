"""`ray job submit ... -- python -m ray_jobs.tune CONFIG --output ... [--num-samples N] [--then-train] [--data ...]
[--set k=v ...]`."""

import argparse
import sys

from gunsound.cli import add_tune_arguments, job_parser, main, run_tune


def build_parser() -> argparse.ArgumentParser:
    return job_parser("python -m ray_jobs.tune", "Sweep an experiment with Ray Tune", add_tune_arguments, run_tune)


if __name__ == "__main__":
    sys.exit(main(parser=build_parser()))
