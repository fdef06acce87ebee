"""``python -m igdtrigger``: the command line (``igdtrigger.cli.entry``, then
``igdtrigger.cli.main``); the exit code is its."""

import sys

from igdtrigger.cli.entry import main

sys.exit(main())
