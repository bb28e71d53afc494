"""``python -m stepdistill.toy build`` is ``stepdistill toy build``."""

import sys

from ..cli import main

sys.exit(main(["toy", *sys.argv[1:]]))
