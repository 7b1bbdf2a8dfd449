"""Ray Serve application: an ``Ingress`` over ``--num-replicas`` engine replicas, one adapter catalog.

``build_app({...})`` is the builder ``serve run`` calls (keys are ``loraplex serve`` flags, ``model`` the positional
one); ``serve_cluster(args)`` is ``loraplex serve --num-replicas N``: a local Ray cluster (or ``--ray-address``),
Serve's HTTP proxy on ``--host:--port``, until Ctrl-C.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time

from ray import serve
from ray.serve import Application

from loraplex.scaleout.args import MAX_ADAPTERS_PER_REPLICA, add_cluster_args, check_cluster_args
from loraplex.scaleout.ingress import Ingress
from loraplex.scaleout.replica import lru_replica
from loraplex.server.args import add_serve_args

log = logging.getLogger("loraplex.scaleout")
APP_NAME = "loraplex"
NAMESPACE = "loraplex"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex serve")
    add_serve_args(p)
    add_cluster_args(p)
    return p


def application(args: argparse.Namespace, app_name: str = APP_NAME) -> Application:
    """The Serve application for parsed ``loraplex serve`` flags."""
    check_cluster_args(args)
    n = args.num_replicas or 1
    per_replica = args.max_adapters_per_replica or args.max_cpu_loras or MAX_ADAPTERS_PER_REPLICA
    catalog = (f"catalog-{app_name}", NAMESPACE)
    replica_args = copy.copy(args)  # adapters come from the catalog; the ingress seeds it with --lora-modules
    replica_args.lora_modules, replica_args.no_demo_adapters, replica_args.adapter_dir = [], True, None
    replica_args.router_scorer = "lexical"  # model "auto" is routed once, at the ingress
    replica = serve.deployment(lru_replica(per_replica), name="EngineReplica", num_replicas=n,
                               max_ongoing_requests=max(args.max_num_seqs * 4, 64),
                               ray_actor_options={"num_cpus": args.replica_cpus})
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(replica_args, catalog), args, catalog, not args.no_adapter_affinity)


def argv_of(config: dict) -> list[str]:
    """``serve run`` arguments (``key=value``) → ``loraplex serve`` flags: ``model`` is the positional argument,
    lists (``lora_modules``) are space-separated, switches take ``true`` / ``false``."""
    actions = {a.dest: a for a in parser()._actions}
    argv: list[str] = []
    for key, value in config.items():
        if key == "model":
            argv.insert(0, str(value))
            continue
        action = actions.get(key)
        if action is None:
            raise ValueError(f"{key}: not a loraplex serve flag (use its name with underscores, e.g. num_replicas)")
        flag = action.option_strings[0]
        if action.nargs == 0:
            if str(value).lower() in ("1", "true", "yes"):
                argv.append(flag)
        elif action.nargs == "+":
            argv += [flag, *(value if isinstance(value, list) else str(value).split())]
        else:
            argv += [flag, str(value)]
    return argv


def build_app(config: dict) -> Application:
    """``serve run loraplex.ray_serve:build_app model=PATH num_replicas=2 lora_modules="a=/p b=/q"``."""
    return application(parser().parse_args(argv_of(config)))


def serve_cluster(args: argparse.Namespace) -> int:
    """``loraplex serve --num-replicas N``: start (or attach to) Ray, deploy, serve until interrupted."""
    import ray

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    app = application(args)  # flag errors before Ray starts
    ray.init(address=args.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    log.info("serving %d engine replicas on http://%s:%d (Ray Serve)", args.num_replicas, args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
