"""The ``statefn`` command: run the data plane locally or in a pod, and operate it."""
