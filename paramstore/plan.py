"""The network needs of a data-parallel training step: a parameter server
(paramstore) against ring all-reduce. Pure arithmetic, no I/O, so the
`paramstore plan` command, benchmarks and trainers share one model.

docs/network.md derives every formula and names its sources (the BytePS
OSDI'20 analysis; ring all-reduce after Patarasuk & Yuan 2009 and Thakur
et al. 2005). Units: bytes, seconds, bytes/s; a link carries `bandwidth` in
each direction at once (full duplex) and every host has one link.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
}
COMPRESSIONS = ("none", "float16", "bfloat16", "int8", "topk:0.01")
# Top-k pushes carry (flat index, value) pairs; indices as int64, numpy's
# index type, so a tensor of any size can be addressed.
TOPK_INDEX_BYTES = 8
# Messages one-way latency is paid for: a push is request -> replicate to the
# followers -> their acknowledgement -> answer; a pull is request -> answer.
PUSH_HOPS = 4
PULL_HOPS = 2
MAX_NODES = 4096  # how far `nodes_needed` searches


class PlanError(ValueError):
    """Inputs that describe no job (a count below 1, an unknown dtype...)."""


@dataclass(frozen=True)
class Wire:
    """Bytes per parameter on the wire for a push, for a pull, and for the
    push's copies to the shard's other replicas."""

    name: str
    push: float
    pull: float
    allreduce: float | None  # None: not applicable to a ring all-reduce
    # The entry replica widens a compressed push to the tensor's dtype before
    # proposing it (api/grad_widen.py), so its copies go out full width.
    replicated: float


def wire(compress: str, dtype: str) -> Wire:
    """What a compression option sends per parameter of a `dtype` model.
    float16/bfloat16/int8 cast both directions (int8: one byte per element, its
    per-row float32 scales left out: under 1% for rows of 400+ elements).
    topk:F pushes F of the entries as (index, value) pairs and pulls dense
    values. A ring all-reduce sums at every hop, so neither int8 nor top-k
    carries over to it without re-quantizing (not modelled). Whatever the
    option, the store replicates a push at the model's width."""
    b = dtype_bytes(dtype)
    if compress == "none":
        return Wire(compress, b, b, b, b)
    if compress in ("float16", "bfloat16"):
        c = min(2, b)
        return Wire(compress, c, c, c, b)
    if compress == "int8":
        return Wire(compress, min(1, b), min(1, b), None, b)
    if compress.startswith("topk:"):
        try:
            frac = float(compress[5:])
        except ValueError:
            raise PlanError(f"compress {compress!r}: topk:F needs a number F in (0, 1]") from None
        if not 0 < frac <= 1:
            raise PlanError(f"compress {compress!r}: the top-k fraction must be in (0, 1]")
        return Wire(compress, frac * (TOPK_INDEX_BYTES + b), b, None, b)
    raise PlanError(f"compress {compress!r}: expected one of none, float16, bfloat16, int8, topk:F")


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise PlanError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class Job:
    """A training job and the store it would use.

    `lead_shares[i]` / `host_shares[i]`: the fraction of the model's bytes whose
    shard's pushes and pulls node i takes (the shard's "entry": any replica
    of a shard accepts a push and forwards the body to the others) / hosts.
    None: shard k hosted by the `replication` consecutive nodes from k mod
    nodes, entered at the first, the model spread evenly over the shards
    (what partitioned tensors give; a whole tensor sits in one shard).
    `push_bandwidth` / `pull_bandwidth` replace `bandwidth` on the parameter
    server's links when measured (`paramstore plan --measure`).
    """

    params: int
    workers: int
    bandwidth: float
    step_time: float
    dtype: str = "float32"
    latency: float = 0.0
    nodes: int = 3
    shards: int = 3
    replication: int = 3
    compress: str = "none"
    push_bandwidth: float | None = None
    pull_bandwidth: float | None = None
    lead_shares: tuple[float, ...] | None = None
    host_shares: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("params", "workers", "nodes", "shards", "replication"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("bandwidth", "step_time"):
            if not getattr(self, name) > 0:
                raise PlanError(f"{name} must be positive, got {getattr(self, name)}")
        if self.latency < 0:
            raise PlanError(f"latency must be >= 0, got {self.latency}")
        if self.replication > self.nodes:
            raise PlanError(f"replication {self.replication} needs at least as many nodes (nodes {self.nodes})")
        for name in ("push_bandwidth", "pull_bandwidth"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise PlanError(f"{name} must be positive, got {v}")
        for name in ("lead_shares", "host_shares"):
            v = getattr(self, name)
            if v is not None and len(v) != self.nodes:
                raise PlanError(f"{name} has {len(v)} entries for {self.nodes} nodes")
        dtype_bytes(self.dtype)
        wire(self.compress, self.dtype)

    @property
    def model_bytes(self) -> int:
        return self.params * dtype_bytes(self.dtype)


def even_shares(nodes: int, shards: int, replication: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(lead, host) shares per node for the bootstrap placement (store/placement.py):
    shard k on nodes k, k+1, ... (mod nodes), led by node k mod nodes."""
    lead = [0] * nodes
    host = [0] * nodes
    for k in range(shards):
        lead[k % nodes] += 1
        for j in range(replication):
            host[(k + j) % nodes] += 1
    return tuple(c / shards for c in lead), tuple(c / shards for c in host)


@dataclass(frozen=True)
class Links:
    """Bytes one step puts on each kind of link, per direction."""

    worker_sent: float
    worker_received: float
    node_sent: tuple[float, ...]  # per store node: pulls served + gradients replicated
    node_received: tuple[float, ...]  # per store node: gradients, from workers or entry replicas


def links(job: Job) -> Links:
    """Per step: each worker pushes its gradient for the whole model and pulls
    the whole model. A shard's entry replica takes its part of every worker's
    gradient and sends it on to the shard's replication-1 other replicas
    (paramstore sideloads gradient bodies, widened if they came compressed;
    only a digest goes through the Raft log), and serves its part of every pull."""
    w = wire(job.compress, job.dtype)
    lead, host = (
        (job.lead_shares, job.host_shares)
        if job.lead_shares is not None and job.host_shares is not None
        else even_shares(job.nodes, job.shards, job.replication)
    )
    n, p = job.workers, job.params
    return Links(
        worker_sent=p * w.push,
        worker_received=p * w.pull,
        node_sent=tuple(n * p * f * (w.pull + (job.replication - 1) * w.replicated) for f in lead),
        # From the workers at the entry, from the entry (widened) at the other hosts.
        node_received=tuple(n * p * (f * w.push + (h - f) * w.replicated) for f, h in zip(lead, host, strict=True)),
    )


@dataclass(frozen=True)
class Timing:
    push: float  # the push phase: gradients in, replicated
    pull: float  # the pull phase
    total: float  # push then pull, latency included (a loop that pushes, then pulls)
    overlapped: float  # the busiest link alone: pushes and pulls overlapping (BytePS's bound)
    bottleneck: str
    bottleneck_seconds: float
    links: dict[str, float]  # seconds each kind of link is busy per step


def ps_timing(job: Job) -> Timing:
    lk = links(job)
    w = wire(job.compress, job.dtype)
    lead = job.lead_shares if job.lead_shares is not None else even_shares(job.nodes, job.shards, job.replication)[0]
    b_push = job.push_bandwidth or job.bandwidth
    b_pull = job.pull_bandwidth or job.bandwidth
    n, p = job.workers, job.params
    replicated = max(n * p * f * (job.replication - 1) * w.replicated for f in lead)
    push = max(lk.worker_sent, max(lk.node_received), replicated) / b_push + PUSH_HOPS * job.latency
    pulled = max(n * p * f * w.pull for f in lead)
    pull = max(lk.worker_received, pulled) / b_pull + PULL_HOPS * job.latency
    candidates = {
        "worker uplink (gradients out)": lk.worker_sent / b_push,
        "worker downlink (parameters in)": lk.worker_received / b_pull,
        "store node downlink (gradients in)": max(lk.node_received) / b_push,
        "store node uplink (pulls + replication out)": max(lk.node_sent) / min(b_push, b_pull),
    }
    name = max(candidates, key=lambda k: candidates[k])
    return Timing(push, pull, push + pull, candidates[name], name, candidates[name], candidates)


@dataclass(frozen=True)
class AllReduce:
    sent: float  # = received, per worker
    time: float | None  # None: the compression does not apply to all-reduce


def allreduce(job: Job) -> AllReduce:
    """Ring all-reduce (reduce-scatter then all-gather): each worker sends and
    receives 2(N-1)/N of the model in 2(N-1) steps, each paying the latency once."""
    w = wire(job.compress, job.dtype)
    n = job.workers
    if w.allreduce is None:
        return AllReduce(0.0, None)
    sent = 2 * (n - 1) / n * job.params * w.allreduce
    return AllReduce(sent, sent / job.bandwidth + 2 * (n - 1) * job.latency)


def _spread(job: Job, nodes: int) -> Job:
    """`job` on `nodes` store nodes: shards rounded up to a multiple of the
    nodes (each node leads as many), replication kept (at most `nodes`)."""
    return replace(
        job,
        nodes=nodes,
        shards=-(-job.shards // nodes) * nodes,
        replication=min(job.replication, nodes),
        lead_shares=None,
        host_shares=None,
    )


def _fewest(fits: Callable[[int], bool], limit: int) -> int | None:
    """The smallest n in [1, limit] with fits(n), for a fits that stays true
    once true (a node's load only falls as nodes are added), or None."""
    if not fits(limit):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def nodes_needed(job: Job, limit: int = MAX_NODES) -> int | None:
    """The fewest store nodes whose push-then-pull time is within the step
    time, or None if even `limit` nodes do not get there (the workers' own
    links are then the limit: compress, or use faster links)."""
    return _fewest(lambda n: ps_timing(_spread(job, n)).total <= job.step_time, limit)


def nodes_for_worker_links(job: Job, limit: int = MAX_NODES) -> int | None:
    """The fewest store nodes whose links carry no more per step than a
    worker's own (the store stops being the bottleneck): with N workers and
    replication R that is N*R nodes for even placement, BytePS's k = n
    servers when R = 1."""

    def fits(n: int) -> bool:
        t = ps_timing(_spread(job, n))
        floor = max(t.links["worker uplink (gradients out)"], t.links["worker downlink (parameters in)"])
        return t.overlapped <= floor * (1 + 1e-9)

    return _fewest(fits, limit)


@dataclass(frozen=True)
class Option:
    """One compression option's figures, for the comparison table."""

    compress: str
    worker_sent: float
    worker_received: float
    ps_time: float
    ps_overlapped: float
    allreduce_time: float | None
    nodes_needed: int | None


@dataclass(frozen=True)
class Plan:
    job: Job
    model_bytes: int
    worker_sent: float
    worker_received: float
    node_sent: tuple[float, ...]
    node_received: tuple[float, ...]
    ps: Timing
    ps_ratio: float  # communication (push then pull) / compute
    allreduce_sent: float
    allreduce_time: float | None
    allreduce_ratio: float | None
    nodes_needed: int | None
    nodes_for_worker_links: int | None
    options: tuple[Option, ...] = field(default=())

    @property
    def verdict(self) -> list[str]:
        """The reading of the figures, one sentence each."""
        j, ps, ar = self.job, self.ps, self.allreduce_time
        out = []
        if ar is None:
            out.append(f"Ring all-reduce cannot sum {j.compress}-compressed gradients hop by hop (not compared).")
        elif ps.overlapped < ar:
            out.append(
                f"A parameter server fits better: {_s(ps.overlapped)} per step with pushes and pulls overlapping "
                f"(each link direction busy once; BytePS's case), against {_s(ar)} for ring all-reduce, which "
                f"sends and receives 2(N-1)/N of the model per worker."
            )
        else:
            out.append(
                f"Ring all-reduce fits better: {_s(ar)} per step against {_s(ps.overlapped)} for the parameter "
                f"server even with pushes and pulls overlapping."
            )
        if ar is not None and ps.overlapped < ar <= ps.total:
            out.append(
                f"Only with that overlap: a worker that pushes, then pulls, waits {_s(ps.total)} (both halves in turn)."
            )
        out.append(f"The parameter server's bottleneck is the {ps.bottleneck}: {_s(ps.bottleneck_seconds)} per step.")
        enough = self.nodes_for_worker_links
        if enough is not None and enough > j.nodes:
            out.append(
                f"{enough} store nodes (replication {min(j.replication, enough)}) "
                "would carry no more per link than a worker does."
            )
        if self.nodes_needed is None:
            out.append(
                f"No number of store nodes brings push then pull under the {_s(j.step_time)} step: "
                "the workers' own links are the limit (compress, or faster links)."
            )
        else:
            out.append(f"{self.nodes_needed} store node(s) bring push then pull under the {_s(j.step_time)} step.")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["job"]["model_bytes"] = self.model_bytes
        d["verdict"] = self.verdict
        return d


def _s(seconds: float) -> str:
    return f"{seconds:.3g} s"


def plan(job: Job, options: Sequence[str] = COMPRESSIONS) -> Plan:
    """Every figure `paramstore plan` shows, for `job` and each compression option."""
    lk = links(job)
    ps = ps_timing(job)
    ar = allreduce(job)
    opts = []
    for name in dict.fromkeys([*options, job.compress]):
        j = replace(job, compress=name)
        jl, jt = links(j), ps_timing(j)
        opts.append(
            Option(
                name, jl.worker_sent, jl.worker_received, jt.total, jt.overlapped, allreduce(j).time, nodes_needed(j)
            )
        )
    return Plan(
        job=job,
        model_bytes=job.model_bytes,
        worker_sent=lk.worker_sent,
        worker_received=lk.worker_received,
        node_sent=lk.node_sent,
        node_received=lk.node_received,
        ps=ps,
        ps_ratio=ps.total / job.step_time,
        allreduce_sent=ar.sent,
        allreduce_time=ar.time,
        allreduce_ratio=None if ar.time is None else ar.time / job.step_time,
        nodes_needed=nodes_needed(job),
        nodes_for_worker_links=nodes_for_worker_links(job),
        options=tuple(opts),
    )


def effective_push_bandwidth(measured: float, replication: int) -> float:
    """The link rate that explains one client's measured push rate: in this
    model a lone push of M bytes takes max(1, R-1)·M/B, its entry replica
    forwarding it to the R-1 others through its own uplink."""
    return measured * max(1, replication - 1)


def parse_count(text: str) -> int:
    """A parameter count: `7e9`, `7000000000`, `7_000_000_000`, `7B`, `350M`, `10k`."""
    t = text.strip().replace("_", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:].lower(), 1.0) if t else 1.0
    if scale != 1.0:
        t = t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise PlanError(f"parameter count {text!r}: expected a number such as 7e9 or 350M") from None
    if not math.isfinite(value) or value < 1 or value != math.floor(value):
        raise PlanError(f"parameter count {text!r}: expected a whole number >= 1")
    return int(value)


def parse_duration(text: str, unit: float) -> float:
    """Seconds from `50us`, `0.2ms`, `1.5s`; a bare number is in `unit` seconds."""
    t = text.strip().lower()
    for suffix, scale in (("us", 1e-6), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if t.endswith(suffix):
            t, unit = t[: -len(suffix)], scale
            break
    try:
        value = float(t) * unit
    except ValueError:
        raise PlanError(f"duration {text!r}: expected a number with an optional unit (us, ms, s)") from None
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"duration {text!r}: expected a finite duration >= 0")
    return value


def gbit(gbits_per_s: float) -> float:
    """Gbit/s to bytes/s."""
    return gbits_per_s * 1e9 / 8
