"""``python -m mechcliff.cli``: the ``mechcliff`` command (as ``python -m mechcliff``)."""

import sys

from mechcliff.cli import main

sys.exit(main())
