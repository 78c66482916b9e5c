"""`python -m lbproxy`: the `lbproxy` command (its console script's entry point)."""

import sys

from lbproxy.console import main

sys.exit(main())
