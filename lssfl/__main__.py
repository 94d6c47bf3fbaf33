"""``python -m lssfl``: the ``lssfl`` command."""

import sys

from lssfl.cli import main

sys.exit(main())
