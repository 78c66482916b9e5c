"""The `lbproxy` console script: `lbproxy.cli.main`, with one thing done first.

For `serve`, SIGHUP is held (`lbproxy.startup_hup`) before the rest of lbproxy and its
libraries are imported, so that a reload signal sent while the proxy starts is never
fatal. Other subcommands keep SIGHUP's default (a closed terminal ends `demo`, `sim`).
"""

from __future__ import annotations

import sys


def main() -> int:
    if "serve" in sys.argv[1:]:
        from lbproxy import startup_hup

        startup_hup.hold()
    from lbproxy.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
