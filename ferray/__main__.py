"""`python -m ferray` is the `ferray` command."""

import sys

from ferray.cli import main

sys.exit(main())
