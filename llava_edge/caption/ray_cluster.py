"""Joining the Ray cluster of `caption --ray` and sizing its workers: one-line errors instead of Ray's minutes
of retries against an address where nothing answers, or a pool that waits forever for CPUs no node has."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket

from ..errors import UserError

CONNECT_TIMEOUT_S = 5.0
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # paths and JSON lines only: the images never travel
AUTH_HINT = ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
             "or ~/.ray/auth_token")


def is_client_address(address: str) -> bool:
    return address.startswith("ray://")


def host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"--ray {address}: give local, auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def resolve_auto() -> str | None:
    """The address `auto` names (RAY_ADDRESS, else the cluster last started here), None when there is none."""
    try:
        from ray._private.services import get_ray_address_from_environment  # no public equivalent

        found = get_ray_address_from_environment("auto", None)
    except Exception:  # a Ray without it, or nothing found: ray.init says so itself
        return None
    return None if found in (None, "", "auto", "local") else found


def check_reachable(address: str) -> None:
    """A cluster address where nothing answers fails here in seconds (ray.init retries for many minutes)."""
    if address == "local":
        return
    target = resolve_auto() if address == "auto" else address
    if target is None:
        return
    try:
        socket.create_connection(host_port(target), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        shown = address if target == address else f"{address} ({target})"
        raise UserError(f"--ray {shown}: no Ray cluster answers there ({e.strerror or e})") from None


def connect(address: str):
    """ray, initialised on the cluster `address` names (local: a new one on this machine)."""
    import ray

    if is_client_address(address) and importlib.util.find_spec("grpc") is None:
        raise UserError(f"--ray {address}: ray:// needs Ray Client (grpcio): pip install 'llava-edge[ray]'")
    check_reachable(address)
    options = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address == "local":
        options.update(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                       object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError) as e:
        hint = "" if address in ("local", "auto") else f"; {AUTH_HINT}"
        raise UserError(f"--ray {address}: cannot join the cluster ({' '.join(str(e).split())}{hint})") from None
    return ray


def node_cpus(ray) -> list[int]:
    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]


def plan_workers(cpus: list[int], workers: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, threads each) for nodes of `cpus` CPUs: by default one actor per node, each with as many cores
    as every actor can have; refused in one line when the actors cannot all be placed (Ray would wait)."""
    cpus = [c for c in cpus if c >= 1]
    if not cpus:
        raise UserError("--ray: the cluster has no node with a CPU")
    workers = workers or len(cpus)
    if threads is None:
        threads = max(1, min(max(cpus), sum(cpus) // workers))
        while threads > 1 and sum(c // threads for c in cpus) < workers:
            threads -= 1
    fits = sum(c // threads for c in cpus)
    if fits < workers:
        raise UserError(f"--workers {workers} of --threads {threads}: the cluster's nodes ({', '.join(map(str, cpus))} "
                        f"CPUs) hold {fits} such workers")
    return workers, threads
