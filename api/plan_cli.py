"""`paramstore plan`: a training job's network needs, parameter server against
ring all-reduce (the maths: paramstore/plan.py; the formulas: docs/network.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from paramstore import ParamStoreError
from paramstore.plan import (
    COMPRESSIONS,
    DTYPE_BYTES,
    Job,
    Plan,
    PlanError,
    effective_push_bandwidth,
    gbit,
    parse_count,
    parse_duration,
    plan,
)

from .plan_parts import partition_shares, partitions_for_mb

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I8": "int8",
    "U8": "int8",
}
TORCH_DTYPES = {"torch.float64": "float64", "torch.float32": "float32", "torch.float16": "float16"}
TORCH_DTYPES.update({"torch.bfloat16": "bfloat16", "torch.int8": "int8", "torch.uint8": "int8"})

Table = tuple[str, list[str], list[list[str]]]


def add_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="a training job's network needs: parameter server against ring all-reduce",
        description="Bytes per step per worker and per store node, communication time for paramstore "
        "(push, replication, pull) and for ring all-reduce, the bottleneck link, how many store nodes keep "
        "communication under the compute time, and what each compression option changes (docs/network.md).",
    )
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", help="parameter count, e.g. 7e9, 350M")
    size.add_argument("--model", type=Path, help="count the parameters of a .safetensors file or torch checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="parameter dtype (default: the file's, else float32)")
    p.add_argument("--workers", type=int, required=True, help="data-parallel workers")
    p.add_argument("--bandwidth", type=float, default=10.0, help="each host's link, Gbit/s per direction (default 10)")
    p.add_argument("--latency", default="50us", help="one-way latency per message (bare number: ms; default 50us)")
    p.add_argument("--step-time", default="1s", help="compute time of one step (bare number: s; default 1s)")
    p.add_argument("--replicas", type=int, default=3, help="store nodes (default 3)")
    p.add_argument("--shards", type=int, help="shards (default: one per store node)")
    p.add_argument("--replication", type=int, help="replicas per shard (default: 3, at most --replicas)")
    p.add_argument(
        "--compress",
        default="none",
        help="none | float16 | bfloat16 | int8 | topk:F (the option the main figures use; all are compared)",
    )
    parts = p.add_mutually_exclusive_group()
    parts.add_argument(
        "--partitions",
        type=int,
        help="the model as one tensor cut into K parts, placed as the store places them (per-node traffic from "
        "the real placement; default: the model spread evenly over the shards)",
    )
    parts.add_argument(
        "--partition-mb", type=float, help="as --partitions, K chosen as the store does for parts of about M MB"
    )
    p.add_argument("--name", default="model", help="the partitioned tensor's name (placement hashes it)")
    p.add_argument("--rows", help="its first dimension, which parts cut (default: the parameter count, 1-D)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.add_argument(
        "--measure",
        metavar="URL",
        help="measure push and pull throughput against this running cluster (comma-separated replica URLs) "
        "and use them instead of --bandwidth for the store's links; nodes, shards, replication and the "
        "shards' placement come from its /v1/cluster",
    )
    p.add_argument("--measure-mb", type=float, default=64.0, help="size of the probe tensor --measure pushes (MB)")
    p.add_argument("--measure-rounds", type=int, default=3, help="pushes and pulls --measure times (median)")
    p.add_argument("--token", default=os.environ.get("PARAMSTORE_TOKEN"), help="API token for --measure")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        job, notes = job_from_args(args)
        result = plan(job)
    except (PlanError, OSError) as e:
        print(f"paramstore plan: {e}", file=sys.stderr)
        return 2
    except ParamStoreError as e:
        print(f"paramstore plan: --measure {args.measure}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(result.to_dict(), notes=notes), indent=2), file=out)
    else:
        render(tables(result), [*notes, *result.verdict], out)
    return 0


def job_from_args(args: argparse.Namespace) -> tuple[Job, list[str]]:
    notes: list[str] = []
    if args.model is not None:
        params, file_dtype = count_model(args.model)
        notes.append(f"{args.model}: {params:,} parameters, mostly {file_dtype}")
    else:
        params, file_dtype = parse_count(args.params), "float32"
    nodes = args.replicas
    kw: dict[str, Any] = {}
    if args.measure:
        from .plan_measure import measure

        urls = [u.strip() for u in args.measure.split(",") if u.strip()]
        m = measure(urls, int(args.measure_mb * 1e6), args.measure_rounds, args.token)
        where = m.placement
        nodes = len(where.nodes)
        kw = {
            "push_bandwidth": effective_push_bandwidth(m.push_bytes_per_s, where.replication),
            "pull_bandwidth": m.pull_bytes_per_s,
            "shards": where.shards,
            "replication": where.replication,
            "lead_shares": where.lead_shares,
            "host_shares": where.host_shares,
        }
        notes.append(
            f"measured at {args.measure} with a {fmt_bytes(m.probe_bytes)} tensor (median of {m.rounds}): "
            f"push {fmt_rate(m.push_bytes_per_s)} (links: {fmt_rate(kw['push_bandwidth'])}, the entry forwarding "
            f"each push to {where.replication - 1} replicas), pull {fmt_rate(m.pull_bytes_per_s)}; "
            f"{nodes} nodes, {where.shards} shards, replication {where.replication}, leaders as placed now"
        )
    shards = kw.pop("shards", None) or args.shards or nodes
    replication = kw.pop("replication", None) or args.replication or min(3, nodes)
    if args.partitions is not None or args.partition_mb is not None:
        kw.update(partitioned(args, params, args.dtype or file_dtype, nodes, shards, replication, notes))
    job = Job(
        params=params,
        dtype=args.dtype or file_dtype,
        workers=args.workers,
        bandwidth=gbit(args.bandwidth),
        latency=parse_duration(args.latency, 1e-3),
        step_time=parse_duration(args.step_time, 1.0),
        nodes=nodes,
        shards=shards,
        replication=replication,
        compress=args.compress,
        **kw,
    )
    return job, notes


def partitioned(
    args: argparse.Namespace, params: int, dtype: str, nodes: int, shards: int, replication: int, notes: list[str]
) -> dict[str, Any]:
    """lead_shares / host_shares for the model as one partitioned tensor."""
    rows = parse_count(args.rows) if args.rows is not None else params
    if not 1 <= rows <= params or params % rows:
        raise PlanError(f"--rows {rows} must divide the parameter count {params:,}")
    if min(shards, replication, nodes) < 1 or replication > nodes:
        raise PlanError(f"{nodes} nodes, {shards} shards, replication {replication} place no tensor")
    k = args.partitions
    if k is None:
        k = partitions_for_mb(rows, params * DTYPE_BYTES.get(dtype, 4), args.partition_mb, shards)
    lead, host = partition_shares(args.name, rows, k, nodes, shards, replication)
    used = sorted({i for i, f in enumerate(lead) if f})
    notes.append(
        f"{args.name!r} in {k} part(s) of {rows // k:,}-{-(-rows // k):,} rows over {shards} shards: pushes and "
        f"pulls enter at node(s) {', '.join(str(i) for i in used)} of 0..{nodes - 1} (the bootstrap leaders)"
    )
    return {"lead_shares": lead, "host_shares": host}


def count_model(path: Path) -> tuple[int, str]:
    """(parameter count, the dtype most parameters have) of a safetensors file
    (its header only) or a torch checkpoint (loaded with weights_only: no
    arbitrary unpickling, and onto the meta device: no tensor data read)."""
    counts: Counter[str] = Counter()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(key)
                counts[SAFETENSORS_DTYPES.get(sl.get_dtype(), "float32")] += math.prod(sl.get_shape())
    else:
        try:
            import torch
        except ImportError:
            raise PlanError(f"{path}: not a .safetensors file, and torch (for checkpoints) is not installed") from None
        try:
            obj = torch.load(path, map_location="meta", weights_only=True)
        except Exception as e:  # torch raises many types for a file that is not a checkpoint
            raise PlanError(f"{path}: not a safetensors file or torch checkpoint ({e})") from None
        stack: list[Any] = [obj]
        while stack:
            o = stack.pop()
            if isinstance(o, torch.Tensor):
                counts[TORCH_DTYPES.get(str(o.dtype), "float32")] += o.numel()
            elif isinstance(o, dict):
                stack.extend(o.values())
            elif isinstance(o, (list, tuple)):
                stack.extend(o)
    total = sum(counts.values())
    if total == 0:
        raise PlanError(f"{path}: no tensors found")
    return total, counts.most_common(1)[0][0]


# ---- rendering --------------------------------------------------------------------------
def tables(p: Plan) -> list[Table]:
    j = p.job
    link = f"{j.bandwidth * 8 / 1e9:g} Gbit/s ({fmt_rate(j.bandwidth)})"
    if j.push_bandwidth is not None and j.pull_bandwidth is not None:
        link += f"; store measured: push {fmt_rate(j.push_bandwidth)}, pull {fmt_rate(j.pull_bandwidth)}"
    job_rows = [
        ["model", f"{j.params:,} parameters x {j.dtype} = {fmt_bytes(p.model_bytes)}"],
        ["workers", str(j.workers)],
        ["links", f"{link}, latency {fmt_time(j.latency)}"],
        ["compute per step", fmt_time(j.step_time)],
        ["store", f"{j.nodes} nodes, {j.shards} shards, replication {j.replication}"],
        ["compression", j.compress],
    ]
    busiest_in, busiest_out = max(p.node_received), max(p.node_sent)
    bytes_rows = [
        ["worker, parameter server", fmt_bytes(p.worker_sent), fmt_bytes(p.worker_received)],
        ["busiest store node", fmt_bytes(busiest_out), fmt_bytes(busiest_in)],
        ["all store nodes together", fmt_bytes(sum(p.node_sent)), fmt_bytes(sum(p.node_received))],
        [
            "worker, ring all-reduce",
            *([fmt_bytes(p.allreduce_sent)] * 2 if p.allreduce_time is not None else ["n/a", "n/a"]),
        ],
    ]
    ratio = "{:.2f}x".format
    time_rows = [
        ["parameter server: push (gradients in, replicated)", fmt_time(p.ps.push), ratio(p.ps.push / j.step_time)],
        ["parameter server: pull", fmt_time(p.ps.pull), ratio(p.ps.pull / j.step_time)],
        ["parameter server: push then pull", fmt_time(p.ps.total), ratio(p.ps_ratio)],
        [
            "parameter server: busiest link alone (overlapped)",
            fmt_time(p.ps.overlapped),
            ratio(p.ps.overlapped / j.step_time),
        ],
        [
            "ring all-reduce",
            fmt_time(p.allreduce_time) if p.allreduce_time is not None else "n/a",
            ratio(p.allreduce_ratio) if p.allreduce_ratio is not None else "n/a",
        ],
        ["bottleneck (parameter server)", p.ps.bottleneck, ""],
        ["store nodes: links no busier than a worker's", str(p.nodes_for_worker_links or "over 4096"), ""],
        ["store nodes: push then pull under compute", str(p.nodes_needed) if p.nodes_needed else "none suffice", ""],
    ]
    option_rows = [
        [
            o.compress,
            fmt_bytes(o.worker_sent),
            fmt_bytes(o.worker_received),
            fmt_time(o.ps_time),
            ratio(o.ps_time / j.step_time),
            fmt_time(o.ps_overlapped),
            fmt_time(o.allreduce_time) if o.allreduce_time is not None else "n/a",
            str(o.nodes_needed) if o.nodes_needed else "none suffice",
        ]
        for o in p.options
    ]
    return [
        ("Job", ["", ""], job_rows),
        ("Bytes per step", ["", "sent", "received"], bytes_rows),
        ("Communication per step", ["", "time", "x compute"], time_rows),
        (
            "Compression",
            [
                "option",
                "worker sends",
                "worker receives",
                "PS push+pull",
                "x compute",
                "PS overlapped",
                "all-reduce",
                "nodes needed",
            ],
            option_rows,
        ),
    ]


def render(tabs: list[Table], notes: list[str], out: TextIO) -> None:
    """A rich table when rich is installed (it is in the server extra), else aligned text."""
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:
        render_text(tabs, notes, out)
        return
    console = Console(file=out, width=120)
    for title, headers, rows in tabs:
        t = RichTable(title=title, show_header=any(headers), title_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    for note in notes:
        console.print(note, highlight=False)


def render_text(tabs: list[Table], notes: list[str], out: TextIO) -> None:
    for title, headers, rows in tabs:
        print(title, file=out)
        body = [headers, *rows] if any(headers) else rows
        widths = [max(len(r[i]) for r in body) for i in range(len(headers))]
        for r in body:
            cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            print("  " + "  ".join(cells).rstrip(), file=out)
        print(file=out)
    for note in notes:
        print(note, file=out)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_rate(n: float) -> str:
    return fmt_bytes(n) + "/s"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


__all__ = ["COMPRESSIONS", "add_subcommand", "count_model", "run"]
