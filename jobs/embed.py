"""`ray job submit -- python jobs/embed.py IN OUT`: the same code as `ferray embed`."""

import sys

from ferray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
