"""`ray job submit ... -- python -m ray_jobs.train CONFIG --output ... [--data ...] [--set k=v ...]`."""

import argparse
import sys

from gunsound.cli import add_run_arguments, job_parser, main, run_train


def build_parser() -> argparse.ArgumentParser:
    return job_parser("python -m ray_jobs.train", "Train an experiment's folds", add_run_arguments, run_train)


if __name__ == "__main__":
    sys.exit(main(parser=build_parser()))
