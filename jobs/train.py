"""`ray job submit -- python jobs/train.py IN MODEL_OUT`: the same code as `ferray train`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
