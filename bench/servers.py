"""The fresh nats-server and etcd a run measures on, configured as everywhere else in the project.

They use ``statefn_sidecar/serverconf``, like the tests and ``statefn dev``: JetStream fsyncs every
write before acknowledging it (``sync_interval: always``) and etcd fsyncs its WAL. ``--nats-no-fsync``
drops the ``sync_interval`` line (JetStream's default: acknowledge first, fsync every 2 minutes) so
the cost of that durability can be measured the same way (bench/README.md, "Durability settings").
"""

from __future__ import annotations

import re

from statefn_sidecar import devservers

_SYNC = re.compile(r"^\s*sync_interval\s*:\s*(\S+)", re.MULTILINE)


def _config_text(no_fsync: bool) -> str:
    text = (devservers.CONF_DIR / "nats-server.conf").read_text()
    return _SYNC.sub("  # sync_interval dropped by python -m bench --nats-no-fsync", text) if no_fsync else text


def sync_setting(no_fsync: bool) -> str:
    """How JetStream syncs in this run, for the record."""
    found = _SYNC.search(_config_text(no_fsync))
    return f"JetStream sync_interval {found.group(1)}" if found else "JetStream sync_interval default (2m)"


class NatsServer(devservers.NatsServer):
    """The project's nats-server, optionally without ``sync_interval`` (its config file in the workdir)."""

    def __init__(self, *, no_fsync: bool) -> None:
        super().__init__()
        self.conf = self.workdir / "nats-server.conf"
        self.conf.write_text(_config_text(no_fsync))

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("-c") + 1] = str(self.conf)
        return cmd
