"""The statefn control plane (kopf operator): CRD handlers, pod templates, autoscaling.

Not built yet: see the Kubernetes issue. The package exists so the layering contracts hold.
"""
