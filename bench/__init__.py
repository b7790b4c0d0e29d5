"""statefn benchmarks: the platform measured against the floor of its own I/O, in the same run.

Absolute numbers say as much about the machine as about the code, so every run first measures
the floor (the raw NATS and etcd round trips of the hot path, with the clients the sidecar uses)
on fresh servers, then the platform on the same servers, and reports ratios. Run ``make bench``
(``python -m bench``); ``python -m bench --quick`` is a small version for smoke tests.
"""
