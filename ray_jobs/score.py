"""`ray job submit ... -- python -m ray_jobs.score MODEL INPUT OUTPUT [--set k=v ...]`."""

import argparse
import sys

from gunsound.cli import add_score_arguments, job_parser, main, run_score


def build_parser() -> argparse.ArgumentParser:
    return job_parser("python -m ray_jobs.score", "Score an audio archive", add_score_arguments, run_score)


if __name__ == "__main__":
    sys.exit(main(parser=build_parser()))
