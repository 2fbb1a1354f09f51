"""Joining the Ray cluster of `caption --ray` and sizing its workers: one-line errors instead of Ray's minutes
of retries against an address where nothing answers, or a pool that waits forever for CPUs no node has."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path

from ..errors import UserError

CONNECT_TIMEOUT_S = 5.0
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # paths and JSON lines only: the images never travel
AUTH_HINT = ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
             "or ~/.ray/auth_token; if it does not, RAY_AUTH_MODE=disabled")


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


def use_the_token_ray_left(address: str, environ=os.environ) -> bool:
    """Turn on token authentication for joining `address` when RAY_AUTH_MODE is unset and a token is at hand
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as Ray itself does for `auto` only. Since Ray
    2.59, `ray start --head` authenticates with the token a local ray.init() wrote to ~/.ray/auth_token, yet a
    driver given the address does not send it. Must run before `import ray`, which reads RAY_AUTH_MODE once.
    True when it turned it on."""
    if address == "local" or environ.get("RAY_AUTH_MODE") is not None:
        return False
    default = Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH") or default.is_file():
        environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def connect(address: str):
    """ray, initialised on the cluster `address` names (local: a new one on this machine)."""
    use_the_token_ray_left(address)
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
