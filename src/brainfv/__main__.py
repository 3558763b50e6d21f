"""``python -m brainfv ...``: the same as the ``brainfv`` command (see :mod:`brainfv.cli`)."""
import sys

from .cli import main

sys.exit(main())
