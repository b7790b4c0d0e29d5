"""The statefn data plane: partitions, ownership, execution, commit, outbox, timers, gateway."""
