"""`python -m server [serve] ...`: the `kairos` command; with no subcommand it serves."""

import sys

from server.cli import COMMANDS, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    sys.exit(main(argv))
