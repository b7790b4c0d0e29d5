"""Commands that talk to a running platform: invoke, state, dead letters."""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

import statefn
from statefn_cli import common

app = typer.Typer()
state_app = typer.Typer(help="Read committed state.")
dlq_app = typer.Typer(help="List and replay dead letters.")


def _parse_args(pairs: list[str], as_json: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if as_json:
        try:
            loaded = json.loads(as_json)
        except ValueError as exc:
            raise common.fail(f"--json is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise common.fail("--json must be a JSON object of the handler's arguments")
        args.update(loaded)
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise common.fail(f"--arg takes name=value, got {pair!r}")
        try:
            args[name] = json.loads(raw)
        except ValueError:
            args[name] = raw
    return args


def _print_json(value: Any) -> None:
    common.console.print_json(json.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)))


@app.command("invoke")
def invoke_cmd(
    function: Annotated[str, typer.Argument(help="namespace/name")],
    key: str,
    handler: str,
    arg: Annotated[list[str] | None,
                   typer.Option("--arg", help="name=value (value parsed as JSON if it parses)")] = None,
    as_json: Annotated[str | None, typer.Option("--json", help="all arguments as one JSON object")] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    no_wait: Annotated[bool, typer.Option("--async", help="enqueue and return the invocation id")] = False,
    timeout: float = 30.0,
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
) -> None:
    """Invoke a handler and print its reply as JSON."""
    args = _parse_args(arg or [], as_json)

    async def main() -> None:
        async with common.client(nats_url, etcd, timeout=timeout) as client:
            if no_wait:
                _print_json({"invocation_id": await client.send(function, key, handler,
                                                                idempotency_key=idempotency_key, **args)})
                return
            try:
                result = await client.invoke(function, key, handler, idempotency_key=idempotency_key, **args)
            except statefn.InvocationFailed as exc:
                raise common.fail(f"{exc.kind}: {exc.message}") from None
            _print_json(result)

    common.run(main())


@state_app.command("get")
def state_get_cmd(
    function: Annotated[str, typer.Argument(help="namespace/name")],
    key: str,
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
) -> None:
    """Print the committed state of one key."""

    async def main() -> None:
        async with common.client(nats_url, etcd) as client:
            await client.describe(function)  # an unknown function is an error, not empty state
            _print_json(await client.get_state(function, key))

    common.run(main())


@dlq_app.command("list")
def dlq_list_cmd(
    function: Annotated[str | None, typer.Option("--function", help="only this namespace/name")] = None,
    limit: int = 100,
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
) -> None:
    """List dead letters, oldest first."""
    with common.needs("sidecar"):
        from statefn_sidecar import deadletters

    async def main() -> None:
        async with common.client(nats_url, etcd) as client:
            letters = await deadletters.list_dead_letters(client.nats.jetstream(), function=function, limit=limit)
        table = Table(title=f"{len(letters)} dead letter(s)")
        for col in ("seq", "function", "key", "handler", "attempts", "error", "message", "failed at"):
            table.add_column(col, overflow="fold")
        for d in letters:
            r = d.record
            when = datetime.datetime.fromtimestamp(float(r.get("failed_at", 0)), datetime.UTC)
            table.add_row(str(d.seq), d.function, str(r.get("key")), str(r.get("handler")), str(r.get("attempts")),
                          str(d.error.get("kind")), str(d.error.get("message")), when.strftime("%Y-%m-%d %H:%M:%S"))
        common.console.print(table)

    common.run(main())


@dlq_app.command("replay")
def dlq_replay_cmd(
    seqs: Annotated[list[int] | None, typer.Argument(help="dead letter sequence numbers")] = None,
    replay_all: Annotated[bool, typer.Option("--all")] = False,
    function: Annotated[str | None, typer.Option("--function", help="with --all: only this namespace/name")] = None,
    repeat_steps: Annotated[bool, typer.Option(
        "--repeat-steps", help="run from the start even invocations that finished calls or ctx.run steps "
                               "(those steps run again); without it, such an invocation resumes from its "
                               "journal, or is refused when it ran a transaction or its journal expired")] = False,
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
) -> None:
    """Send dead letters again as new invocations (each runs once even if replayed twice).

    Letters whose replay would apply effects twice, or effects a caller was told did not happen,
    are refused with the reason and left in place; the command then exits with status 1.
    """
    if bool(seqs) == replay_all:
        raise common.fail("give dead letter sequence numbers, or --all")

    with common.needs("sidecar"):
        from statefn_sidecar import deadletters

    async def main() -> int:
        refused = 0
        async with common.client(nats_url, etcd) as client:
            js = client.nats.jetstream()
            if replay_all:
                letters = await deadletters.list_dead_letters(js, function=function, limit=1_000_000)
            else:
                letters = [await deadletters.get_dead_letter(js, s) for s in seqs or []]
            with Progress(console=common.console, transient=True) as progress:
                task = progress.add_task("replaying", total=len(letters))
                for letter in letters:
                    try:
                        idem = await deadletters.replay(client, letter, repeat_steps=repeat_steps)
                    except statefn.StatefnError as exc:
                        refused += 1
                        common.console.print(f"[red]not replayed[/red]: {exc}")
                    else:
                        common.console.print(f"replayed {letter.seq} ({letter.function} "
                                             f"{letter.record.get('key')!r}.{letter.record.get('handler')}) as {idem}")
                    progress.advance(task)
        return refused

    if common.run(main()):
        raise typer.Exit(1)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '12h' or '7d'."""
    unit = text[-1:].lower()
    try:
        return float(text[:-1]) * _UNITS[unit] if unit in _UNITS else float(text)
    except ValueError:
        raise common.fail(f"not a duration: {text!r} (give seconds, or a number with s, m, h or d)") from None


@dlq_app.command("purge")
def dlq_purge_cmd(
    function: Annotated[str | None, typer.Option("--function", help="only this namespace/name")] = None,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="those that failed longer ago: 7d, 12h, 30m")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="all but the newest N")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="every one (of --function, if given)")] = False,
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
) -> None:
    """Delete dead letters for good. The stream also drops them by itself past 30 days, or past 100,000 per function."""
    if sum((older_than is not None, keep is not None, purge_all)) != 1:
        raise common.fail("say which to delete: --older-than DURATION, --keep N or --all")
    age = _duration(older_than) if older_than is not None else None
    with common.needs("sidecar"):
        from statefn_sidecar import deadletters

    async def main() -> None:
        async with common.client(nats_url, etcd) as client:
            gone = await deadletters.purge(client.nats.jetstream(), function=function, older_than=age, keep=keep)
        common.console.print(f"purged {gone} dead letter(s){f' of {function}' if function else ''}")

    common.run(main())
