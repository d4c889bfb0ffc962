"""`ray job submit -- python jobs/align.py IN OUT`: the same code as `ferray align`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
