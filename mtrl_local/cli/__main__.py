"""``python -m mtrl_local.cli``: the ``mtrl`` command."""

import sys

from mtrl_local.cli import main

sys.exit(main())
