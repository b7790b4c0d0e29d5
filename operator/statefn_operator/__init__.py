"""The statefn control plane (kopf operator): CRD handlers, pod templates, autoscaling.

So far: the pure builders of what a StatefulFunction becomes (``manifests``). The kopf handlers,
stream provisioning and the autoscaler come next (see the Kubernetes issue).
"""
