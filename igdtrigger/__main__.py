import sys

from igdtrigger.cli.main import main

sys.exit(main())
