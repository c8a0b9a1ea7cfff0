"""Run the command-line interface as `python -m srquant`."""

import sys

from srquant.cli import main

sys.exit(main())
