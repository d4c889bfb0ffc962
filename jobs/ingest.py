"""`ray job submit -- python jobs/ingest.py DATASET SOURCE OUT`: the same code as `ferray ingest`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
