"""What every command shares: connection options, and errors as one red line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import nats.errors
import pydantic
import typer
from rich.console import Console

import statefn

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)

NatsOpt = Annotated[str, typer.Option("--nats", envvar="STATEFN_NATS", help="NATS server URL")]
EtcdOpt = Annotated[str, typer.Option("--etcd", envvar="STATEFN_ETCD", help="etcd endpoint host:port")]
DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_ETCD = "127.0.0.1:2379"

_EXPECTED = (statefn.StatefnError, OSError, nats.errors.Error, pydantic.ValidationError, TimeoutError, ValueError)


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; expected failures become one line and exit code 1."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    except _EXPECTED as exc:
        raise fail(str(exc) or type(exc).__name__) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
