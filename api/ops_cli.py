"""Operator subcommands of `paramstore`: status, get, put, checkpoint save|load,
cluster add|remove.

Each talks HTTP to one replica (`--url`, or PARAMSTORE_URL, default
http://127.0.0.1:8700). `run(args, http=...)` accepts any httpx.Client, so
tests can drive the commands against an in-process app.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx
import numpy as np

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8700"
CHUNK = 1 << 20
EXIT_HTTP_ERROR = 1
EXIT_UNREACHABLE = 4


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_HTTP_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _with_url(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--url",
        default=os.environ.get("PARAMSTORE_URL", DEFAULT_URL),
        help=f"a replica's base URL (or PARAMSTORE_URL; default {DEFAULT_URL})",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds")
    p.add_argument(
        "--token",
        default=os.environ.get("PARAMSTORE_TOKEN"),
        help="API bearer token (or PARAMSTORE_TOKEN); writes need a write token",
    )
    p.add_argument("--cacert", help="CA bundle to verify an https:// replica with")
    return p


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_status_get_put(sub)
    _add_checkpoint_commands(sub)
    _add_cluster_commands(sub)
    from . import export_cli  # paramstore export (api/export_cli.py)

    export_cli.add_subcommand(sub)
    from . import plan_cli  # paramstore plan (api/plan_cli.py; dispatched by its handler)

    plan_cli.add_subcommand(sub)


def _add_status_get_put(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = _with_url(sub.add_parser("status", help="print the cluster table of one replica"))
    st.add_argument("--json", action="store_true", help="print /v1/cluster as JSON instead")

    get = _with_url(sub.add_parser("get", help="download a tensor to a .npy file"))
    get.add_argument("name")
    get.add_argument("-o", "--output", required=True, help="output .npy file ('-' for stdout)")
    get.add_argument(
        "--linearizable", action="store_true", help="never older than an acknowledged write (a Raft barrier first)"
    )

    put = _with_url(sub.add_parser("put", help="create or replace a tensor from a .npy file"))
    put.add_argument("name")
    put.add_argument("file", help=".npy file")
    put.add_argument("--optimizer", help='JSON optimizer spec, e.g. \'{"type": "sgd", "lr": 0.1}\'')
    put.add_argument("--create", action="store_true", help="fail if the tensor exists (If-None-Match: *)")
    put.add_argument("--if-version", type=int, help="replace only if at this version (If-Match)")


def _add_checkpoint_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ck = sub.add_parser("checkpoint", help="save or restore every tensor as one safetensors file")
    cks = ck.add_subparsers(dest="checkpoint_command", required=True)
    save = _with_url(cks.add_parser("save", help="download a checkpoint"))
    save.add_argument("file")
    save.add_argument("--no-state", action="store_true", help="leave optimizer state out")
    load = _with_url(cks.add_parser("load", help="restore a checkpoint"))
    load.add_argument("file")
    load.add_argument(
        "--mode",
        choices=("create", "replace"),
        default="create",
        help="create: only tensors that do not exist (default); replace: all",
    )
    load.add_argument(
        "--if-unchanged",
        action="store_true",
        help="with --mode replace: only replace tensors still at their checkpoint version",
    )
    for p in (save, load):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_cluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cl = sub.add_parser("cluster", help="change membership: add or remove a replica")
    cls = cl.add_subparsers(dest="cluster_command", required=True)
    add = _with_url(
        cls.add_parser(
            "add",
            help="make a replica a voting member (start it with `paramstore serve --join` first, "
            "which downloads a snapshot and adds itself; this re-adds or adds by hand)",
        )
    )
    add.add_argument("id")
    for field in ("http", "raft", "data"):
        add.add_argument(f"--{field}", required=True, metavar="HOST:PORT", help=f"the replica's {field} address")
    remove = _with_url(
        cls.add_parser("remove", help="remove a replica, live or dead (leadership is moved away from it first)")
    )
    remove.add_argument("id")
    for p in (add, remove):
        p.add_argument("--shards", help="comma-separated shards (default: every shard the --url replica hosts)")


COMMANDS = ("status", "get", "put", "checkpoint", "cluster", "export")


def run(args: argparse.Namespace, http: httpx.Client | None = None, out: TextIO | None = None) -> int:
    """Run one operator command; returns the exit status."""
    out = out or sys.stdout
    own = http is None
    client = http or httpx.Client(
        timeout=httpx.Timeout(args.timeout, connect=5.0),
        verify=ssl.create_default_context(cafile=args.cacert) if args.cacert else True,
    )
    base = args.url.rstrip("/")
    args.auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        if args.command == "status":
            return _status(client, base, args, out)
        if args.command == "get":
            return _get(client, base, args, out)
        if args.command == "put":
            return _put(client, base, args, out)
        if args.command == "cluster":
            return _cluster(client, base, args, out)
        if args.command == "export":
            from . import export_cli

            return export_cli.run(client, base, args, out)
        if args.checkpoint_command == "save":
            return _save(client, base, args, out)
        return _load(client, base, args, out)
    except CommandError as e:
        print(f"paramstore {args.command}: {e}", file=sys.stderr)
        return e.code
    except httpx.TransportError as e:
        print(f"paramstore {args.command}: cannot reach {base}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        if own:
            client.close()


def _check(r: httpx.Response, ok: tuple[int, ...] = (200,)) -> httpx.Response:
    if r.status_code in ok:
        return r
    try:
        r.read()
        doc = r.json()
        detail = f"{doc.get('error')}: {doc.get('detail')}"
    except Exception:
        detail = r.text[:500]
    raise CommandError(f"HTTP {r.status_code} from {r.request.method} {r.request.url.path}: {detail}")


# ---- cluster add|remove ---------------------------------------------------------------
def _cluster(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    shards = [int(s) for s in args.shards.split(",")] if args.shards else None
    if args.cluster_command == "add":
        body: dict[str, Any] = {"id": args.id, "http": args.http, "raft": args.raft, "data": args.data}
        if shards is not None:
            body["shards"] = shards
        r = client.post(base + "/v1/cluster/members", json=body, headers=args.auth)
    else:
        params = {"shards": args.shards} if args.shards else None
        r = client.delete(base + f"/v1/cluster/members/{args.id}", params=params, headers=args.auth)
    doc = _check(r).json()
    for item in doc["shards"]:
        print(f"shard {item['shard']}: {doc['node']} {item['status']}", file=out)
    return 0


# ---- status ---------------------------------------------------------------------------
def _status(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    doc = _check(client.get(base + "/v1/cluster", headers=args.auth)).json()
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=120)
    nodes = Table(
        title=f"paramstore: asked {doc['node']} "
        f"({'ready' if doc.get('ready') else 'NOT ready'}, up {doc.get('uptime_seconds', 0):.0f}s)"
    )
    for col in ("node", "http", "raft", "data"):
        nodes.add_column(col)
    for n in doc["nodes"]:
        nodes.add_row(n["id"] + (" *" if n["id"] == doc["node"] else ""), n["url"], n["raft"], n["data"])
    console.print(nodes)
    shards = Table(title=f"shards (replication {doc.get('replication')}; role, indexes as seen by {doc['node']})")
    for col in (
        "shard",
        "replicas",
        "leader",
        "role",
        "term",
        "commit",
        "applied",
        "lag",
        "log",
        "tensors",
        "bytes",
        "ready",
    ):
        shards.add_column(col, justify="right" if col not in ("replicas", "leader", "role") else "left")
    for s in doc["shards"]:
        hosted = "term" in s
        lag = s["commit_index"] - s["applied_index"] if hosted else None
        cells = [str(s["shard"]), ",".join(s.get("replicas", []))]
        if hosted:
            cells += [
                str(s.get("leader") or "-"),
                s.get("role", "?"),
                str(s["term"]),
                str(s["commit_index"]),
                str(s["applied_index"]),
                str(lag),
                str(s.get("log_entries", "")),
                str(s.get("tensors", "")),
                _human(s.get("bytes", 0)),
                "yes" if s.get("ready") else "NO",
            ]
        else:
            cells += ["(not hosted here)"] + [""] * 9
        shards.add_row(*cells)
    console.print(shards)
    console.print(_replica_table(client, base, doc, args.auth))
    return 0


def _replica_table(client: httpx.Client, base: str, doc: dict[str, Any], auth: dict[str, str]) -> Table:
    """Every replica's own view (asked directly, 2 s each): the role it plays
    in each shard and how far it has applied. Unreachable replicas say so."""
    from rich.table import Table

    table = Table(title="replicas (each asked directly: role / term / applied index per shard)")
    table.add_column("node")
    table.add_column("ready")
    for s in doc["shards"]:
        table.add_column(f"shard {s['shard']}")
    for n in doc["nodes"]:
        url = base if n["id"] == doc["node"] else n["url"]
        try:
            view = doc if url == base else client.get(url + "/v1/cluster", headers=auth, timeout=2.0).json()
        except (httpx.HTTPError, ValueError) as e:
            table.add_row(n["id"], f"unreachable ({type(e).__name__})", *[""] * len(doc["shards"]))
            continue
        cells = []
        for s in view.get("shards", []):
            cells.append(f"{s['role']} / {s['term']} / {s['applied_index']}" if "term" in s else "-")
        table.add_row(n["id"], "yes" if view.get("ready") else "NO", *cells)
    return table


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- get / put --------------------------------------------------------------------------
def _get(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    params = {"consistency": "linearizable"} if args.linearizable else {}
    r = _check(
        client.get(
            f"{base}/v1/tensors/{args.name}",
            params=params,
            headers={"Accept": "application/x-npy", **args.auth},
            follow_redirects=True,
        )
    )
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    if args.output == "-":
        sys.stdout.buffer.write(r.content)
    else:
        np.save(args.output, arr, allow_pickle=False)
        print(
            f"{args.name}: {arr.dtype}{list(arr.shape)} version {r.headers.get('X-Version')} -> {args.output}", file=out
        )
    return 0


def _put(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    try:
        arr = np.load(args.file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CommandError(f"{args.file}: not a readable .npy file ({e})", code=2) from None
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    headers = {"Content-Type": "application/x-npy", **args.auth}
    if args.optimizer:
        try:
            json.loads(args.optimizer)
        except ValueError as e:
            raise CommandError(f"--optimizer is not valid JSON: {e}", code=2) from None
        headers["X-Optimizer"] = args.optimizer
    if args.create:
        headers["If-None-Match"] = "*"
    if args.if_version is not None:
        headers["If-Match"] = f'"{args.if_version}"'
    r = _check(
        client.put(f"{base}/v1/tensors/{args.name}", content=buf.getvalue(), headers=headers, follow_redirects=True),
        ok=(200, 201),
    )
    doc = r.json()
    print(
        f"{args.name}: {'created' if r.status_code == 201 else 'replaced'}, version {doc['version']} "
        f"(shard {doc['shard']})",
        file=out,
    )
    return 0


# ---- checkpoints ------------------------------------------------------------------------
def _progress(enabled: bool, description: str, total: int | None) -> tuple[Progress, TaskID]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    task = progress.add_task(description, total=total)
    return progress, task


def _save(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    target = Path(args.file)
    partial = target.with_name(target.name + ".partial")
    params = {"state": "0" if args.no_state else "1"}
    try:
        with client.stream("GET", base + "/v1/checkpoint", params=params, headers=args.auth) as r:
            _check(r)
            total = int(r.headers["content-length"]) if "content-length" in r.headers else None
            progress, task = _progress(not args.no_progress, f"saving {target.name}", total)
            with progress, open(partial, "wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
                    progress.update(task, advance=len(chunk))
        from safetensors import safe_open

        with safe_open(str(partial), framework="numpy") as f:  # verify before replacing an older file
            meta = json.loads((f.metadata() or {}).get("paramstore", "{}"))
            count = len(meta.get("tensors", {}))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    print(f"saved {count} tensors ({target.stat().st_size} bytes) from {meta.get('node')} to {target}", file=out)
    missing = meta.get("cluster_shards", 0) - len(meta.get("shards", []))
    if missing > 0:
        print(
            f"warning: {meta.get('node')} hosts {len(meta['shards'])} of {meta['cluster_shards']} shards; "
            "save from a replica of each missing shard too",
            file=sys.stderr,
        )
    return 0


def _load(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CommandError(f"{path}: no such file", code=2)
    size = path.stat().st_size
    params = {"mode": args.mode}
    if args.if_unchanged:
        if args.mode != "replace":
            raise CommandError("--if-unchanged needs --mode replace", code=2)
        params["if_match"] = "checkpoint"
    progress, task = _progress(not args.no_progress, f"loading {path.name}", size)

    def body() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                progress.update(task, advance=len(chunk))
                yield chunk

    with progress:
        r = client.put(
            base + "/v1/checkpoint",
            params=params,
            content=body(),
            headers={"Content-Type": "application/x-safetensors", "Content-Length": str(size), **args.auth},
        )
    try:
        doc: dict[str, Any] = r.json()
    except ValueError:
        doc = {}
    if "created" not in doc:
        _check(r)
    exist = sum(1 for d in doc["skipped"] if d.get("reason") == "exists")
    print(
        f"created {len(doc['created'])}, replaced {len(doc['replaced'])}, "
        f"skipped {exist} (already exist), failed {len(doc['failed'])}",
        file=out,
    )
    if "table_rows" in doc:
        print(
            f"tables: created {len(doc['tables_created'])}, replaced {len(doc['tables_replaced'])}, "
            f"skipped {len(doc['tables_skipped'])}, {sum(doc['table_rows'].values())} rows loaded",
            file=out,
        )
    elsewhere = [d for d in doc["skipped"] if d.get("reason") == "not_hosted"]
    if elsewhere:
        shards = sorted({d["shard"] for d in elsewhere})
        print(
            f"warning: {len(elsewhere)} tensors of shards {shards} are not hosted by this replica; "
            f"load the file on one of {elsewhere[0]['hosts']} too",
            file=sys.stderr,
        )
    for f in doc["failed"]:
        print(f"  failed {f['name']}: {f.get('error')}: {f.get('detail')}", file=out)
    restored = set(doc.get("state_restored", []))
    without_state = [n for n in [*doc["created"], *doc["replaced"]] if n not in restored]
    if without_state:
        print(
            f"note: {len(without_state)} tensors had no optimizer state in the file (plain SGD has none); "
            "their optimizers start fresh",
            file=out,
        )
    return 0 if not doc["failed"] else EXIT_HTTP_ERROR


def main(argv: list[str], http: httpx.Client | None = None, out: TextIO | None = None) -> int:
    """Parse and run one operator command (tests pass an in-process client)."""
    parser = argparse.ArgumentParser(prog="paramstore")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv), http, out)
