"""`ray job submit ... -- python -m ray_jobs.train CONFIG [--data ...] [--output ...] [--set k=v ...]`."""

import argparse
import sys

from gunsound.cli import EXIT_CODES, add_run_arguments, main, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train", description="Train an experiment's folds",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.set_defaults(func=run_train)
    sys.exit(main(parser=parser))
