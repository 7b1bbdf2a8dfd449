"""Scale-out: several engine replicas behind one endpoint (Ray Serve). Sits above ``server/``: a replica runs the
single-node app; the ingress forwards to it. Ray is imported only by ``ray_serve`` and the modules it loads.

``serve run loraplex.ray_serve:build_app model=PATH num_replicas=2`` or ``loraplex serve --num-replicas 2``.
"""
