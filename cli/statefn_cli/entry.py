"""The ``statefn`` console script: a clear word instead of a traceback when the CLI's extra is missing.

A handler-only install (``pip install statefn``) still gets the script; the commands need at
least ``statefn[serve]``, and each plane's commands its own extra (checked where they start).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from statefn_cli import main as cli
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"error: the statefn command needs the serve extra (missing {exc.name}): "
                         "pip install 'statefn[serve]' (or 'statefn[all]' for every command)\n")
        raise SystemExit(1) from None
    cli.main()
