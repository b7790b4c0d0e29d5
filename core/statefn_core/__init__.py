"""statefn's core: what the SDK, the sidecar, the operator and the CLI all build on.

The names and defaults every plane must agree on (``constants``), where everything lives in NATS
and etcd (``layout``), the formats on the wire and in storage (``codec``, ``envelope``, ``wire``),
the errors and their kinds (``errors``), and process plumbing (``signals``). It imports nothing
else of statefn. Users never import it: the public API is ``statefn``.
"""
