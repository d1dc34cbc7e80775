"""``python -m tui [RUN]``: the same as ``mtrl dash [RUN]``."""

import sys

from mtrl_local.cli import main

sys.exit(main(["dash", *sys.argv[1:]]))
