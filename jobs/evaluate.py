"""`ray job submit -- python jobs/evaluate.py MODEL DATA REPORT_OUT`: the same code as `ferray evaluate`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
