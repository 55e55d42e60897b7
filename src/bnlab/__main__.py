"""``python -m bnlab``: the ``bnlab`` command."""

import sys

from .cli import main

sys.exit(main())
