"""Ray Serve: the same FastAPI app as N replicas behind Ray's HTTP proxy (`t2 serve --ray`).

Contract:
- `run(config)` joins the cluster at `config.ray_address` (or starts a local one), starts Serve's HTTP proxy
  on `config.host:config.port` (so clients and health checks do not change), deploys `T2Replica`
  (`config.replicas` replicas, or autoscaling between `replicas` and `max_replicas`) and blocks until
  SIGINT/SIGTERM; then it deletes the app (and, for a local cluster, stops Serve and Ray).
  `deploy(config)` / `undeploy(...)` are the same steps without the blocking, for tests and scripts.
- Each replica calls `create_app(config)`: its own engine and experts, the whole API unchanged (streaming,
  /v1/models, /health, /metrics). Every response carries `x-t2-replica` (the Serve replica id) and
  `x-t2-replica-pid`.
- Routing is Ray Serve's default: power-of-two-choices on each replica's ongoing requests, i.e. least
  loaded. A replica takes at most `max_batch` requests at once; the rest wait in the proxy's router, where
  any replica that frees a slot takes them (with mixed batches every replica serves every adaptation at the
  same cost, so there is no affinity to keep).
- Expert set consistency: an `ExpertLedger` actor holds the ordered log of admin loads and unloads. The
  replica that serves `POST /admin/experts` or `DELETE /admin/experts/{name}` applies it itself (the app's
  own checks: admin key, name, folder), then appends it to the log and answers only once every live
  replica has applied the log up to that entry (header `x-t2-experts-version`; replicas that did not
  confirm within `EXPERT_SYNC_TIMEOUT_S` are named in `x-t2-experts-pending`). Each replica follows the log
  with a long poll (which doubles as its heartbeat and acknowledgement) and replays the whole log before it
  serves its first request, so a replica started later (a restart, a scale-up) has the same expert set.
  Loads name the resolved file path, so on several nodes the admin experts folder must be the same
  shared path on each.
- `import ray` happens in this module only (ray is the optional extra `.[ray]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import ray
from ray import serve

from server.config import ServerConfig

log = logging.getLogger("t2.ray")

APP_NAME = "t2"
NAMESPACE = "t2"
LEDGER_NAME = "t2-expert-ledger"
REPLICA_HEADER, PID_HEADER = b"x-t2-replica", b"x-t2-replica-pid"
EXPERT_SYNC_TIMEOUT_S = 30.0
POLL_S = 5.0                 # a replica's long poll; it is live while it polled within LIVE_S
LIVE_S = 3 * POLL_S


# ---- the expert ledger: one actor, the order of every admin change ----
@ray.remote(num_cpus=0, max_restarts=-1)
class ExpertLedger:
    """Ordered log of expert loads/unloads; which replica has applied how much of it."""

    def __init__(self) -> None:
        self.log: list[dict] = []                        # entry i has version i + 1
        self.seen: dict[str, tuple[int, float]] = {}     # replica -> (applied version, last poll)
        self._changed = asyncio.Event()

    def _touch(self, replica: str, version: int) -> None:
        self.seen[replica] = (version, time.monotonic())
        self._changed.set()
        self._changed = asyncio.Event()

    async def record(self, op: str, name: str, path: str | None) -> int:
        self.log.append({"op": op, "name": name, "path": path})
        self._changed.set()
        self._changed = asyncio.Event()
        return len(self.log)

    async def follow(self, replica: str, version: int, timeout: float) -> list[dict]:
        """The entries after `version` (waiting up to `timeout` for one); also: `replica` applied `version`."""
        self._touch(replica, version)
        if len(self.log) <= version:
            try:
                await asyncio.wait_for(self._wait_log(version), timeout)
            except asyncio.TimeoutError:
                pass
        return self.log[version:]

    async def _wait_log(self, version: int) -> None:
        while len(self.log) <= version:
            await self._changed.wait()

    async def synced(self, version: int, timeout: float) -> list[str]:
        """Wait until every live replica applied `version`; the ones that did not (empty: all did)."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            pending = [r for r, (v, t) in self.seen.items() if v < version and now - t < LIVE_S]
            if not pending or now >= deadline:
                return pending
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - now))
            except asyncio.TimeoutError:
                pass

    async def leave(self, replica: str) -> None:
        self.seen.pop(replica, None)

    async def replicas(self) -> dict[str, int]:
        now = time.monotonic()
        return {r: v for r, (v, t) in self.seen.items() if now - t < LIVE_S}


def _ledger():
    return ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)


# ---- ASGI pieces of a replica ----
class _ReplicaHeaders:
    """Adds the replica's id and pid to every HTTP response."""

    def __init__(self, app, replica: str):
        self.app, self.headers = app, [(REPLICA_HEADER, replica.encode()), (PID_HEADER, str(os.getpid()).encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *self.headers]}
            await send(message)
        await self.app(scope, receive, tagged)


class _AdminBroadcast:
    """After a successful admin load/unload on this replica: log it, wait for every replica, then answer."""

    def __init__(self, app, replica: "T2Replica"):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] not in ("POST", "DELETE") or not path.startswith("/admin/experts"):
            return await self.app(scope, receive, send)
        held: list[dict] = []

        async def hold(message):
            held.append(message)
        await self.app(scope, receive, hold)
        start = held[0]
        if 200 <= start["status"] < 300:
            body = json.loads(b"".join(m.get("body", b"") for m in held[1:]) or b"{}")
            if scope["method"] == "POST":
                version, pending = await self.replica.broadcast("load", body["name"], body.get("path"))
            else:
                version, pending = await self.replica.broadcast("unload", body["deleted"], None)
            extra = [(b"x-t2-experts-version", str(version).encode())]
            if pending:
                extra.append((b"x-t2-experts-pending", ",".join(pending).encode()))
            held[0] = {**start, "headers": [*start.get("headers", ()), *extra]}
        for m in held:
            await send(m)


@serve.ingress()
class T2Replica:
    """One replica: the app of `create_app(config)` with its own engine, following the expert ledger."""

    def __init__(self, config_json: str):
        self.config = ServerConfig.model_validate_json(config_json)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.version = 0                 # how much of the ledger this replica has applied
        self.engine = None

    def __serve_build_asgi_app__(self):
        from server.api.app import create_app
        app = create_app(self.config)
        self.engine = app.state.engine
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a):
            async with inner(a) as state:
                # 1. before the first request: the expert set the other replicas have
                await self._apply(await _ledger().follow.remote(self.id, self.version, 0.0))
                follower = asyncio.create_task(self._follow())
                try:
                    yield state
                finally:
                    follower.cancel()
                    try:
                        await _ledger().leave.remote(self.id)
                    except Exception:  # noqa: BLE001 - the cluster may be going down with us
                        pass
        app.router.lifespan_context = lifespan
        app.add_middleware(_AdminBroadcast, replica=self)
        app.add_middleware(_ReplicaHeaders, replica=self.id)   # added last = outermost
        return app

    async def _apply(self, entries: list[dict]) -> None:
        for e in entries:
            try:
                if e["op"] == "load" and e["name"] not in self.engine.experts:
                    await self.engine.load_expert(Path(e["path"]))
                elif e["op"] == "unload" and e["name"] in self.engine.experts:
                    await self.engine.unload_expert(e["name"])
            except Exception:  # noqa: BLE001 - one bad entry must not stop the replica following the log
                log.exception("replica %s: could not apply %s %s", self.id, e["op"], e["name"])
            self.version += 1

    async def _follow(self) -> None:
        while True:
            try:
                await self._apply(await _ledger().follow.remote(self.id, self.version, POLL_S))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the ledger restarts (max_restarts): retry
                log.exception("replica %s: following the expert ledger", self.id)
                await asyncio.sleep(1.0)

    async def broadcast(self, op: str, name: str, path: str | None) -> tuple[int, list[str]]:
        """Log a change this replica made; wait until every live replica (this one too) applied it."""
        ledger = _ledger()
        version = await ledger.record.remote(op, name, path)
        # this replica's follower sees the entry at once and skips it (already applied by the app)
        return version, await ledger.synced.remote(version, EXPERT_SYNC_TIMEOUT_S)


# ---- the driver ----
def _deployment(config: ServerConfig):
    opts: dict[str, Any] = dict(
        name="T2Replica",
        max_ongoing_requests=config.max_batch,        # the rest wait in the router, for any replica
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=config.graceful_timeout_s,
    )
    if config.max_replicas and config.max_replicas > config.replicas:
        opts["autoscaling_config"] = {"min_replicas": config.replicas, "max_replicas": config.max_replicas,
                                      "target_ongoing_requests": max(1, config.max_batch // 2)}
    else:
        opts["num_replicas"] = config.replicas
    return serve.deployment(T2Replica).options(**opts)


def deploy(config: ServerConfig) -> bool:
    """Join or start Ray, start the proxy on host:port, deploy the replicas; True when a local Ray was started."""
    local = not (config.ray_address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        ray.init(address=config.ray_address, namespace=NAMESPACE,
                 **({"include_dashboard": False} if local else {}),
                 logging_level=config.log_level.upper())
    ExpertLedger.options(name=LEDGER_NAME, namespace=NAMESPACE, lifetime="detached",
                         get_if_exists=True).remote()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(_deployment(config).bind(config.model_dump_json()), name=APP_NAME, route_prefix="/")
    return local


def undeploy(local: bool) -> None:
    """Delete the app and the ledger; for a local cluster, stop Serve and Ray too."""
    try:
        serve.delete(APP_NAME)
        ray.kill(_ledger())
    except Exception:  # noqa: BLE001 - best effort on the way out
        log.exception("undeploy")
    if local:
        serve.shutdown()
        ray.shutdown()


def run(config: ServerConfig) -> None:
    local = deploy(config)
    log.info("serving on http://%s:%d through Ray Serve (%s replicas)", config.host, config.port,
             f"{config.replicas}..{config.max_replicas}" if config.max_replicas else config.replicas)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    undeploy(local)
