"""Runs one sidecar process for the crash suites: ``python -m tests.run_sidecar APP CONFIG_JSON``."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys

from statefn_sidecar import config, invoker, sidecar


def main() -> None:
    module, _, attr = sys.argv[1].partition(":")
    app = getattr(importlib.import_module(module), attr)
    settings = json.loads(sys.argv[2])
    health_port = settings.pop("health_port")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sc = sidecar.Sidecar(config.SidecarConfig(**settings), invoker.EmbeddedInvoker(app))
    asyncio.run(sc.serve(health_port))


if __name__ == "__main__":
    main()
