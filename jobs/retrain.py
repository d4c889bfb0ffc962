"""`ray job submit -- python jobs/retrain.py --config FILE.yaml`: the same code as `ferray pipeline --retrain`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--retrain", *sys.argv[1:]]))
