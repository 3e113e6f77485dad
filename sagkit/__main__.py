"""``python -m sagkit``: the ``sagkit`` command line."""

import sys

from .cli import main

sys.exit(main())
