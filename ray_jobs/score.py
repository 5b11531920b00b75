"""`ray job submit ... -- python -m ray_jobs.score MODEL INPUT OUTPUT [--set k=v ...]`."""

import argparse
import sys

from gunsound.cli import EXIT_CODES, add_score_arguments, main, run_score

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.score", description="Score an audio archive",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_score_arguments(parser)
    parser.set_defaults(func=run_score)
    sys.exit(main(parser=parser))
