"""``serve run loraplex.ray_serve:build_app model=PATH num_replicas=2``: the Ray Serve application's builder under a
short name (it lives in ``loraplex.scaleout.ray_serve``; this module does not shadow the ``ray`` package)."""
from loraplex.scaleout.ray_serve import build_app

__all__ = ["build_app"]
