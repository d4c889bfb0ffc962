"""`ray job submit -- python jobs/pipeline.py --config FILE.yaml`: the same code as `ferray pipeline`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
