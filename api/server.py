"""Run one replica: the app under uvicorn, one process, one worker."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import ssl
import sys
import time

import uvicorn
from fastapi import FastAPI

from store.config import Config
from store.membership import MembershipFile
from store.node import Store

from .app import create_app
from .auth import check_policy
from .join import plan_join, register
from .slow_clients import protocol_class


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id  # replicas' interleaved logs (compose, journald) stay attributable

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node_id:
            doc["node"] = self.node_id
        for key in ("shard", "term", "request_id", "status", "path"):
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str, node_id: str | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pysyncobj").setLevel("WARNING")


def serve(cfg: Config, join: list[str] | None = None) -> None:
    """Start the store first, so that a corrupt data dir or a busy port stops
    the process with a clear message before any request is accepted. With
    `join` (seed URLs), a fresh data dir first becomes a replica of a running
    cluster (api/join.py)."""
    configure_logging(cfg.log_level, cfg.node_id)
    check_policy(cfg)
    plan = None
    if join and cfg.data_dir is not None and not MembershipFile(cfg.data_dir).exists():
        plan = plan_join(cfg, join)
    store = Store(cfg, plan)
    try:
        store.start()
        if plan is not None:
            register(cfg, plan)
            store.complete_join()
    except BaseException:
        store.close()
        raise
    try:
        _run_http(create_app(cfg, store), cfg)
    finally:
        store.close()


def _connections_within_fd_limit(wanted: int) -> int:
    """Raise the soft descriptor limit to the hard one, and keep the connection
    cap under it with room for journals, payload files and peers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(64, min(wanted, soft - 512)) if soft != resource.RLIM_INFINITY else wanted


def _run_http(app: FastAPI, cfg: Config) -> None:
    node = cfg.node
    tls = cfg.tls
    config = uvicorn.Config(
        app,
        host=node.http.host,
        port=node.http.port,
        workers=1,
        log_config=None,
        http=protocol_class(cfg.limits, _connections_within_fd_limit(cfg.limits.max_connections)),
        loop="uvloop",
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=64 * 1024,
        limit_concurrency=None,  # api/connection_caps.py: requests in flight count, idle connections do not
        ssl_certfile=tls.cert_file,
        ssl_keyfile=tls.key_file,
        ssl_ca_certs=tls.client_ca_file,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
    )
    uvicorn.Server(config).run()
