"""`python -m lbproxy`: the `lbproxy` command."""

import sys

from lbproxy.cli import main

sys.exit(main())
