"""The ``statefn`` command line."""

from __future__ import annotations

import typer

from statefn_cli import control, operate, servers

app = typer.Typer(name="statefn", help="Stateful functions with exactly-once keyed state.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.registered_commands += (servers.app.registered_commands + operate.app.registered_commands
                            + control.app.registered_commands)
app.add_typer(operate.state_app, name="state")
app.add_typer(operate.dlq_app, name="dlq")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
