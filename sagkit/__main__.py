"""``python -m sagkit``: the ``sagkit`` command line."""

import sys

from .lab.cli import main

sys.exit(main())
