"""What every command shares: connection options, errors as one red line, and loading a plane's extra."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterator
from typing import Annotated, Any, TypeVar

import pydantic
import typer
from rich import markup
from rich.console import Console

import statefn

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)

NatsOpt = Annotated[str, typer.Option("--nats", envvar="STATEFN_NATS", help="NATS server URL")]
EtcdOpt = Annotated[str, typer.Option("--etcd", envvar="STATEFN_ETCD", help="etcd endpoint host:port")]
DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_ETCD = "127.0.0.1:2379"

_EXPECTED: tuple[type[BaseException], ...] = (statefn.StatefnError, OSError, pydantic.ValidationError, TimeoutError,
                                              ValueError)


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {markup.escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@contextlib.contextmanager
def needs(extra: str) -> Iterator[None]:
    """Import what a command needs inside this block: a missing extra is one line saying what to install."""
    try:
        yield
    except ImportError as exc:
        raise fail(f"this command needs statefn's {extra} extra (missing module {exc.name!r}): "
                   f"pip install 'statefn[{extra}]'") from None


def client(nats_url: str, etcd: str, **options: Any) -> statefn.Client:
    """A (not yet connected) client; the client extra is what it needs."""
    with needs("client"):
        return statefn.Client(nats=nats_url, etcd=etcd, **options)


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
    except Exception as exc:
        if type(exc).__module__.startswith("nats."):  # a NATS error (the client extra is loaded by now)
            raise fail(str(exc) or type(exc).__name__) from None
        raise


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
