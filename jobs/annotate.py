"""`ray job submit -- python jobs/annotate.py MODEL SOURCE OUT`: the same code as `ferray annotate`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["annotate", *sys.argv[1:]]))
