import sys

from fullscale.cli import main

sys.exit(main())
