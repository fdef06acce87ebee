"""``python -m igdtrigger``: the command line (``igdtrigger.cli.main``); the exit code is its."""

import sys

from igdtrigger.cli.main import main

sys.exit(main())
