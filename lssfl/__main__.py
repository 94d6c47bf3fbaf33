import sys

from lssfl.cli import main

sys.exit(main())
