"""`paramstore export --table NAME --follow DIR`: keeps DIR a servable copy
of a table (paramstore.ServingTable reads it).

It writes a full base file first (`GET /v1/tables/{name}/delta?since=0`),
then one file per delta that changed something, each named by the table
version it is complete up to (20 digits, so names sort in order):
`<version>.safetensors` (the answer's body as it is), then the empty marker
`<version>.done` once the file is whole. The next request starts from the
last file's cursor, also after a restart. A 410 (the store no longer keeps
changes that old) makes it write a fresh base: changes are never skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import httpx

from paramstore._serving import export_metadata
from store import dtypes

from . import safetensors_stream as sts
from .ops_cli import CHUNK, CommandError, _check, _progress, _with_url

RETRY_SECONDS = 1.0


def add_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = _with_url(sub.add_parser("export", help="follow a table's changes into a directory for serving"))
    what = ex.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", help="the table to export")
    what.add_argument("--tensor", help="a dense tensor to export (a file per new version, the tensor whole)")
    ex.add_argument("--follow", required=True, metavar="DIR", help="directory to write base and delta files into")
    ex.add_argument("--once", action="store_true", help="stop once caught up instead of following")
    ex.add_argument("--wait", type=float, default=30.0, help="seconds each long poll waits for changes")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar while a base downloads")


def latest_cursor(directory: Path) -> str | None:
    """The cursor of the newest finished file (None: nothing yet)."""
    done = sorted(directory.glob("*.done"))
    for marker in reversed(done):
        try:
            return str(export_metadata(marker.with_suffix(".safetensors"))["version"])
        except (OSError, ValueError, KeyError):
            continue
    return None


class Exporter:
    def __init__(
        self, client: httpx.Client, base: str, table: str, directory: Path, auth: dict[str, str], out: TextIO
    ) -> None:
        self.client = client
        self.url = f"{base}/v1/tables/{table}/delta"
        self.table = table
        self.directory = directory
        self.auth = auth
        self.out = out
        self.files = 0
        self.progress = False  # a bar while a base file downloads

    def step(self, cursor: str | None, wait: float) -> tuple[str, bool]:
        """One request: a base if `cursor` is None, else a delta (long poll
        when `wait` > 0). Returns the new cursor and whether it changed anything."""
        params: dict[str, str | float] = {"since": cursor or "0"}
        if cursor is not None and wait > 0:
            params.update(wait=1, timeout=wait)
        timeout = httpx.Timeout(max(self.client.timeout.read or 60.0, wait + 30.0), connect=5.0)
        with self.client.stream("GET", self.url, params=params, headers=self.auth, timeout=timeout) as r:
            if r.status_code == 304:
                return cursor or "0", False
            if r.status_code == 410:
                r.read()
                print(f"{self.table}: {r.json().get('detail')}: writing a fresh base", file=self.out)
                return self.step(None, 0)
            _check(r)
            version = int(r.headers["x-table-version"])
            partial = self.directory / f"{version:020d}.safetensors.partial"
            bar, task = _progress(self.progress and cursor is None, f"{self.table}: base", None)
            with bar, open(partial, "wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
                    bar.update(task, advance=len(chunk))
                f.flush()
                os.fsync(f.fileno())
            new_cursor = r.headers["x-version"]
        return new_cursor, self._keep(partial, version, base=cursor is None)

    def _keep(self, partial: Path, version: int, base: bool) -> bool:
        """Publish a finished file (a delta that changed nothing is dropped)."""
        from safetensors import safe_open

        with safe_open(str(partial), framework="numpy") as f:  # also checks the file is whole
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (not a dict)
        rows, removed = (shapes.get(k, [0])[0] for k in ("ids", "removed"))
        if not base and rows == 0 and removed == 0:
            partial.unlink()
            return False
        target = partial.with_name(f"{version:020d}.safetensors")
        os.replace(partial, target)
        target.with_suffix(".done").touch()
        self.files += 1
        what = f"{rows} rows, {removed} removed" if "ids" in shapes else f"shape {shapes.get(self.table)}"
        kind = ("base" if "ids" in shapes else "tensor") if base else "delta"
        print(
            f"{self.table}: {kind} {target.name}: {what} (version {version}, {self.files} files written)",
            file=self.out,
            flush=True,
        )
        return True

    def follow(self, once: bool = False, wait: float = 30.0, stop: Callable[[], bool] = lambda: False) -> int:
        """Until `stop()` (or, with `once`, until a delta brings nothing new)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cursor = latest_cursor(self.directory)
        while not stop():
            try:
                cursor, changed = self.step(cursor, 0 if once else wait)
            except (httpx.TransportError, CommandError) as e:
                if once or (isinstance(e, CommandError) and "HTTP 5" not in str(e)):
                    raise
                print(f"{self.table}: {e}; retrying", file=sys.stderr)
                time.sleep(RETRY_SECONDS)
                continue
            if once and not changed:
                break
        return self.files


class TensorExporter(Exporter):
    """A dense tensor: each new version written whole (a long poll on
    `wait_version_gt`), as a safetensors file holding the tensor under its name."""

    def __init__(
        self, client: httpx.Client, base: str, tensor: str, directory: Path, auth: dict[str, str], out: TextIO
    ) -> None:
        super().__init__(client, base, tensor, directory, auth, out)
        self.url = f"{base}/v1/tensors/{tensor}"

    def step(self, cursor: str | None, wait: float) -> tuple[str, bool]:
        version = int(cursor or 0)
        # at least 1 s: with timeout=0 the tensor route answers 304 even for a newer version
        params = {"wait_version_gt": version, "timeout": max(wait, 1.0)}
        timeout = httpx.Timeout(max(self.client.timeout.read or 60.0, wait + 30.0), connect=5.0)
        headers = {**self.auth, "Accept": "application/octet-stream"}
        with self.client.stream("GET", self.url, params=params, headers=headers, timeout=timeout) as r:
            if r.status_code == 304:
                return str(version), False
            _check(r)
            new = int(r.headers["x-version"])
            shape = tuple(int(d) for d in r.headers["x-shape"].split(",") if d.strip())
            meta = {"format": "paramstore.tensor_export", "tensor": self.table, "kind": "full"}
            meta.update(version=str(new), table_version=str(new))
            entry = sts.Entry(self.table, dtypes.SAFETENSORS[r.headers["x-dtype"]], shape, lambda: iter(()))
            partial = self.directory / f"{new:020d}.safetensors.partial"
            with open(partial, "wb") as f:
                f.write(sts.header([entry], {"paramstore": json.dumps(meta, sort_keys=True)}))
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        return str(new), self._keep(partial, new, base=True)


def run(client: httpx.Client, base: str, args: argparse.Namespace, out: TextIO) -> int:
    stop = threading.Event()
    kind = Exporter if args.table else TensorExporter
    exporter = kind(client, base, args.table or args.tensor, Path(args.follow), args.auth, out)
    exporter.progress = not args.no_progress
    try:
        exporter.follow(once=args.once, wait=args.wait, stop=stop.is_set)
    except KeyboardInterrupt:
        print(f"{exporter.table}: stopped after {exporter.files} files", file=out)
    return 0
