"""The `paramstore` command."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from store.errors import ConfigError, StoreError

# What `pip install 'paramstore[server]'` adds to the client install (pyproject.toml).
SERVER_MODULES = ("fastapi", "uvicorn", "pysyncobj", "cryptography", "prometheus_client", "rich")
EXIT_NO_SERVER = 2


def missing_server_modules() -> list[str]:
    """The server extra's modules that are not installed (no import: find_spec only)."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None:
        missing.append("tomli")
    return missing


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {
        "node.id": args.node,
        "node.data_dir": args.data_dir,
        "raft.password": args.raft_password,
        "log_level": args.log_level,
    }
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    missing = missing_server_modules()
    if missing:
        # A client-only install (`pip install paramstore`) has this console script too.
        print(
            f"paramstore: this command needs the server, which is not installed here "
            f"(missing: {', '.join(missing)}).\nInstall it with: pip install 'paramstore[server]'\n"
            f"(Trainers need only the client: `from paramstore import Client`.)",
            file=sys.stderr,
        )
        return EXIT_NO_SERVER
    from . import ops_cli

    args = _parser().parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is not None:  # a subcommand module registered with set_defaults(handler=...)
        return int(handler(args))
    if args.command in ops_cli.COMMANDS:
        return ops_cli.run(args)
    try:
        return _run_server_command(args)
    except ConfigError as e:
        print(f"paramstore: configuration error: {e.detail}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"paramstore: cannot start: {e.detail}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"paramstore: cannot start: {e}", file=sys.stderr)
        return 3


def _parser() -> argparse.ArgumentParser:
    from . import ops_cli

    parser = argparse.ArgumentParser(prog="paramstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_dev(sub)
    ops_cli.add_subcommands(sub)  # status, get, put, checkpoint save|load, cluster add|remove
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run one replica")
    serve.add_argument("--config", help="cluster TOML file (or PARAMSTORE_CONFIG)")
    serve.add_argument("--node", help="this replica's node id (or PARAMSTORE_NODE)")
    serve.add_argument("--data-dir", help="data directory (or PARAMSTORE_DATA_DIR)")
    serve.add_argument("--raft-password", help="Raft password (prefer PARAMSTORE_RAFT_PASSWORD)")
    serve.add_argument("--log-level", help="debug, info, warning")
    serve.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any setting, e.g. --set raft.min_timeout=0.8",
    )
    serve.add_argument(
        "--join",
        action="append",
        metavar="URL",
        default=None,
        help="join a running cluster through this replica's URL (repeatable; or "
        "PARAMSTORE_JOIN, comma-separated): download a snapshot of each shard, "
        "then add this node. Ignored once the data dir has joined.",
    )


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="run a local cluster on loopback in the foreground")
    dev.add_argument("--replicas", type=int, default=3)
    dev.add_argument("--http-port", type=int, default=8700)
    dev.add_argument("--raft-port", type=int, default=9700)
    dev.add_argument("--shards", type=int, default=4)
    dev.add_argument("--replication", type=int, default=3)
    dev.add_argument("--data-dir", default="data/dev")
    dev.add_argument("--then", help="shell command to run once the cluster is ready (gets PARAMSTORE_URLS)")
    dev.add_argument("--exit-after", action="store_true", help="stop the cluster when the --then command finishes")


def _run_server_command(args: argparse.Namespace) -> int:
    """`serve` or `dev`; their ConfigError, StoreError and OSError reach main."""
    from store.config import load_config  # needs tomli before Python 3.11: a server dependency

    if args.command == "serve":
        cfg = load_config(args.config, overrides=_overrides(args))
        from .server import serve as run_serve

        join = args.join or [u for u in os.environ.get("PARAMSTORE_JOIN", "").split(",") if u]
        run_serve(cfg, join=join or None)
        return 0
    if args.command == "dev":
        from .devcluster import run_dev

        return run_dev(
            args.replicas,
            args.http_port,
            args.raft_port,
            args.shards,
            args.replication,
            Path(args.data_dir),
            args.then,
            args.exit_after,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
