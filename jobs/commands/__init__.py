"""One module per `facegen` sub-command group; each exposes `register(subparsers)`.

A module's `register` adds its parser(s) and sets `func` (called with the parsed args, returns an exit
code). Keeping commands in separate modules keeps `jobs/cli.py` tiny and lets features land without
touching each other.
"""
