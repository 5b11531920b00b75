"""`ray job submit ... -- python -m ray_jobs.tune CONFIG [--num-samples N] [--then-train] [--data ...] [--set k=v ...]`."""

import argparse
import sys

from gunsound.cli import EXIT_CODES, add_tune_arguments, main, run_tune

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.tune", description="Sweep an experiment with Ray Tune",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser)
    parser.set_defaults(func=run_tune)
    sys.exit(main(parser=parser))
