"""`python -m cnnlab ...`: the same command line as `cnnlab ...`."""

import sys

from cnnlab.cli import main

sys.exit(main())
