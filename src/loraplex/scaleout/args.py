"""``loraplex serve --num-replicas N`` flags; free of Ray's imports (plain ``loraplex serve`` never loads Ray)."""
from __future__ import annotations

import argparse

MAX_ADAPTERS_PER_REPLICA = 8


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve", "N engine replicas behind one endpoint, each adapter's requests sent to a "
                                          "replica that holds it (needs pip install 'loraplex[ray]')")
    g.add_argument("--num-replicas", type=int, default=None,
                   help="run N engine replicas with Ray Serve (a local Ray cluster, or --ray-address)")
    g.add_argument("--ray-address", default=None,
                   help='attach to this Ray cluster ("auto": the one started by `ray start`; default: $RAY_ADDRESS, '
                        "else a local cluster)")
    g.add_argument("--max-adapters-per-replica", type=int, default=None,
                   help="adapters registered in one replica's engine (Serve's multiplexed LRU; default "
                        f"--max-cpu-loras, else {MAX_ADAPTERS_PER_REPLICA})")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each engine replica")
    g.add_argument("--no-adapter-affinity", action="store_true",
                   help="route by load only, without Serve's multiplexed model ids (the benchmark's baseline)")


def check_cluster_args(args: argparse.Namespace) -> None:
    """Flag combinations a cluster cannot serve: ``SystemExit`` naming the flag."""
    if args.num_replicas is not None and args.num_replicas < 1:
        raise SystemExit(f"--num-replicas: must be at least 1, got {args.num_replicas}")
    if args.max_adapters_per_replica is not None and args.max_adapters_per_replica < 1:
        raise SystemExit(f"--max-adapters-per-replica: must be at least 1, got {args.max_adapters_per_replica}")
    if args.replica_cpus <= 0:
        raise SystemExit(f"--replica-cpus: must be positive, got {args.replica_cpus}")
    if args.platform or args.db:
        raise SystemExit("--num-replicas: the platform (--platform, --db) runs on a single server; drop one of them")
