"""The simulated-network benchmark (issue 16 item 5; needs root):

    python -m bench.netsim [--nodes 3,5] [--rate 1000] [--params 1e8] [--workers 4] [--steps 3]

For each store size: replicas and workers each on their own host behind
shaped links (bench/netsim/net.py); a data-parallel job whose model is split
into `--tensors` tensors spread evenly over the shards, each worker pushing a
synthetic gradient for every tensor and then pulling every tensor, to and
from one replica per shard (spread over the nodes); the measured step time
beside `paramstore plan`'s prediction for the same topology (the real
placement; the links' nominal rate, and the rates `plan --measure` measures
on the simulated cluster). Then a large tensor pushed and pulled by one worker, in each layout
of LARGE_LAYOUTS (whole, 4 and 12 parts), beside the plan's times for its placement.
`--steps 0` runs the large tensor only; `--shards 12` gives 12 parts 12 shards.
`--compress none,float16,topk:0.01/float16` runs the job once per setup, on the
same cluster: PUSH[/PULL], PUSH one of none, float16, bfloat16, int8, topk:F
(push_grad's wire_dtype or compress), PULL a pull wire dtype (default: PUSH's
dtype, none after topk); beside each, the plan's push phase for PUSH and pull
phase for PULL (`paramstore plan --compress`).
Results: stdout (markdown) and bench/results/netsim-<rate>mbit[-large].json.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api.plan_measure import measure
from api.plan_parts import partition_shares
from paramstore import Client, ParamStoreError
from paramstore.plan import Job, PlanError, effective_push_bandwidth, gbit, ps_timing, wire
from store.placement import shard_for

from .cluster import SimCluster
from .net import NetsimUnavailable, Shape, SimNet, remove_stale, unavailable

RESULTS = Path(__file__).resolve().parents[1] / "results"
# How the large tensor is created: (label, Client.create keyword arguments). A
# partitioned one the SDK pushes and pulls part by part, each to its shard's leader,
# all parts at once.
LARGE_LAYOUTS: list[tuple[str, dict[str, Any]]] = [
    ("whole", {}),
    ("4 parts", {"partitions": 4}),
    ("12 parts", {"partitions": 12}),
]


@dataclass(frozen=True)
class Setup:
    """One compression setup of the job: what the workers send and what the
    plan is asked (its push phase for `plan_push`, pull phase for `plan_pull`)."""

    label: str
    push_kw: dict[str, str]
    pull_wire_dtype: str | None
    plan_push: str
    plan_pull: str


def parse_setup(text: str) -> Setup:
    push, _, pull = text.strip().partition("/")
    wire(push, "float32")  # PlanError names the accepted forms
    if push.startswith("topk:"):
        push_kw = {"compress": push}
        pull = pull or "none"
    else:
        push_kw = {} if push == "none" else {"wire_dtype": push}
        pull = pull or push
    if pull.startswith("topk:"):
        raise PlanError(f"setup {text!r}: pulls are dense (none, float16, bfloat16 or int8)")
    wire(pull, "float32")
    label = push if pull == (push if not push.startswith("topk:") else "none") else f"{push}/{pull}"
    return Setup(label, push_kw, None if pull == "none" else pull, push, pull)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netsim", description=__doc__)
    p.add_argument("--nodes", default="3,5", help="store sizes to run, comma-separated")
    p.add_argument("--rate", type=float, default=1000.0, help="every host link, Mbit/s each way")
    p.add_argument("--delay", type=float, default=0.2, help="one-way delay per host link, ms (needs sch_netem)")
    p.add_argument("--params", type=float, default=1e8, help="model parameters (float32)")
    p.add_argument("--tensors", type=int, default=15, help="tensors the model is split into")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="steps per run; the first is a warm-up (0: no job)")
    p.add_argument("--shards", type=int, default=0, help="shards (default: one per node)")
    p.add_argument("--large-mb", type=float, default=256.0, help="the large tensor, MB (0: skip)")
    p.add_argument(
        "--compress",
        default="none",
        help="job setups, comma-separated: PUSH[/PULL], e.g. none,float16,topk:0.01/float16 (see above)",
    )
    p.add_argument(
        "--report", metavar="JSON", help="only print the tables of a saved run (bench/results/netsim-*.json)"
    )
    args = p.parse_args(argv)
    try:
        setups = [parse_setup(t) for t in args.compress.split(",")]
    except PlanError as e:
        p.error(str(e))
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(report(saved["runs"], argparse.Namespace(**saved["args"])))
        return 0
    why = unavailable()
    if why:
        print(f"bench.netsim: cannot run here: {why}", file=sys.stderr)
        return 2
    remove_stale()
    # SIGTERM (timeout, kill) unwinds like Ctrl-C: the SimNet's teardown runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    tag = "" if args.compress == "none" else "-compress"
    out = RESULTS / f"netsim-{args.rate:g}mbit{tag if args.steps else '-large'}.json"
    try:
        for nodes in (int(n) for n in args.nodes.split(",")):
            with tempfile.TemporaryDirectory(prefix="psim-bench-") as tmp:
                runs.append(run_topology(nodes, args, setups, Path(tmp)))
            RESULTS.mkdir(exist_ok=True)
            out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))  # after each, in case
    except NetsimUnavailable as e:
        print(f"bench.netsim: {e}", file=sys.stderr)
        return 2
    print(report(runs, args))
    return 0


def run_topology(nodes: int, args: argparse.Namespace, setups: list[Setup], tmp: Path) -> dict[str, Any]:
    replicas = [f"r{i + 1}" for i in range(nodes)]
    workers = [f"w{i + 1}" for i in range(args.workers)]
    shape = Shape(rate_mbit=args.rate, delay_ms=args.delay, required=False)
    replication = min(3, nodes)
    shards = args.shards or nodes
    with SimNet(replicas + workers, shape) as net:
        c = SimCluster(net, replicas, tmp, shards=shards, replication=replication, limits={"request_timeout": 300.0})
        c.start()
        c.wait_ready("w1", timeout=120)
        numel = int(args.params) // args.tensors
        names = balanced_names(args.tensors, shards) if args.steps else []

        log(f"{nodes} nodes: cluster up on {shape.describe()} links (applied: {net.applied.describe()}); creating")
        _, hosts = net.call("w1", cluster_view, c)
        entries = spread_entries(replicas, hosts)
        init = np.random.default_rng(0)
        for n in names:
            # Through a replica of the tensor's shard: no 307 to follow. Weights of a
            # usual initialisation's size, not zeros: a few SGD steps of 1e-3 gradients
            # leave zeros at ~1e-6, float16 subnormals, which numpy narrows ~25x slower.
            value = init.standard_normal(numel, dtype=np.float32) * np.float32(0.02)
            create = partial(Client.create, name=n, value=value, optimizer={"type": "sgd", "lr": 1e-3})
            c.with_client("w1", create, first=entries[shard_for(n, shards)], timeout=300, deadline=600)
        leaders, hosts = net.call("w1", cluster_view, c)
        shard_of = {n: shard_for(n, shards) for n in names}
        lead_share, host_share = shares(replicas, names, entries, hosts, shard_of)
        link = gbit(args.rate / 1000)
        job: dict[str, Any] = {}
        if args.steps:
            m = net.call("w1", measure, list(c.urls.values()), 64_000_000, 3, c.token)
            rates = f"push {m.push_bytes_per_s / 1e6:.0f} MB/s, pull {m.pull_bytes_per_s / 1e6:.0f} MB/s"
            job = {"measured_push": m.push_bytes_per_s, "measured_pull": m.pull_bytes_per_s, "setups": []}
            for setup in setups:
                log(f"{nodes} nodes: plan --measure: {rates}; running the job, {setup.label}")
                steps = run_job(net, c, workers, names, numel, entries, shard_of, args.steps, setup, tmp)
                later = steps[1:] or steps
                result = {
                    "setup": setup.label,
                    "steps": steps,
                    "step": statistics.mean(s["step"] for s in later),
                    "push": statistics.mean(s["push"] for s in later),
                    "pull": statistics.mean(s["pull"] for s in later),
                }
                job["setups"].append(result)
                if setup.label == "none":  # the uncompressed job's figures where earlier runs kept them
                    job.update({k: v for k, v in result.items() if k != "setup"})
        large = []
        for label, kw in LARGE_LAYOUTS if args.large_mb else []:
            log(f"{nodes} nodes: large tensor, {label}")
            try:
                large.append(run_large(net, c, args.large_mb, label, kw, replicas, link, hosts))
            except ParamStoreError as e:  # one layout's failure is a row of the table, not the end of the run
                log(f"{nodes} nodes: {label} failed: {e}")
                large.append({"layout": label, "error": str(e)[:300]})
    return {
        "nodes": nodes,
        "shards": shards,
        "replication": replication,
        "shape": shape.__dict__,
        "applied": net.applied.__dict__,
        "leaders": leaders,
        "entries": entries,
        "lead_shares": lead_share,
        "host_shares": host_share,
        **job,
        "large": large,
    }


def cluster_view(c: SimCluster) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Each shard's leader (every replica asked: one knows only the shards it
    hosts) and its replicas."""
    leaders: dict[int, str] = {}
    hosts: dict[int, list[str]] = {}
    auth = {"Authorization": f"Bearer {c.token}"}
    with httpx.Client(timeout=10) as http:
        for url in c.urls.values():
            for s in http.get(url + "/v1/cluster", headers=auth).json()["shards"]:
                hosts[s["shard"]] = s["replicas"]
                if s.get("leader"):
                    leaders[s["shard"]] = s["leader"]
    return leaders, hosts


def balanced_names(count: int, shards: int) -> list[str]:
    """`count` tensor names spread as evenly as the count allows over the shards
    (placement is a hash of the name: store/placement.py)."""
    per_shard = -(-count // shards)
    taken = [0] * shards
    names: list[str] = []
    j = 0
    while len(names) < count:
        name = f"layer{j:03d}"
        k = shard_for(name, shards)
        if taken[k] < per_shard:
            taken[k] += 1
            names.append(name)
        j += 1
    return names


def spread_entries(nodes: list[str], hosts: dict[int, list[str]]) -> dict[int, str]:
    """The replica each shard's pushes and pulls go to. Any replica of a shard
    takes a push and forwards its body to the others itself (the Raft leader
    gets only the small command), so the entries can be spread over the nodes
    whoever the leaders are: each shard to its host with the fewest so far."""
    load = dict.fromkeys(nodes, 0)
    entries = {}
    for k in sorted(hosts):
        entry = min(hosts[k], key=lambda h: (load[h], nodes.index(h)))
        load[entry] += 1
        entries[k] = entry
    return entries


def shares(
    nodes: list[str],
    names: list[str],
    entries: dict[int, str],
    hosts: dict[int, list[str]],
    shard_of: dict[str, int],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The fraction of the model each node takes pushes and pulls of, and hosts."""
    lead = dict.fromkeys(nodes, 0.0)
    host = dict.fromkeys(nodes, 0.0)
    for n in names:
        k = shard_of[n]
        lead[entries[k]] += 1 / len(names)
        for h in hosts[k]:
            host[h] += 1 / len(names)
    return tuple(lead[n] for n in nodes), tuple(host[n] for n in nodes)


def run_job(
    net: SimNet,
    c: SimCluster,
    workers: list[str],
    names: list[str],
    numel: int,
    entries: dict[int, str],
    shard_of: dict[str, int],
    steps: int,
    setup: Setup,
    tmp: Path,
) -> list[dict[str, float]]:
    """Every worker's steps (worker.py), started together; the step of the job
    is the slowest worker's."""
    tensors = [{"name": n, "numel": numel, "url": c.urls[entries[shard_of[n]]]} for n in names]
    start_at = time.time() + 15  # after every worker process has imported and built its gradients
    procs = []
    for i, w in enumerate(workers):
        spec = {
            "token": c.token,
            "urls": list(c.urls.values()),
            "steps": steps,
            "start_at": start_at,
            "seed": i,
            "push": setup.push_kw,
            "pull_wire_dtype": setup.pull_wire_dtype,
        }
        (tmp / f"{w}.spec.json").write_text(json.dumps({**spec, "tensors": tensors}))
        cmd = [sys.executable, "-m", "bench.netsim.worker", str(tmp / f"{w}.spec.json"), str(tmp / f"{w}.json")]
        log_file = open(tmp / f"{w}.log", "wb")  # noqa: SIM115 (closed below, after the worker exits)
        procs.append(
            (w, net.popen(w, cmd, stdout=log_file, stderr=log_file, cwd=Path(__file__).resolve().parents[2]), log_file)
        )
    for w, proc, log_file in procs:
        code = proc.wait(timeout=3600)
        log_file.close()
        if code != 0:
            raise RuntimeError(f"worker {w} failed ({code}): {(tmp / f'{w}.log').read_text()[-2000:]}")
    per_worker = [json.loads((tmp / f"{w}.json").read_text())["steps"] for w in workers]
    return [{k: max(run[i][k] for run in per_worker) for k in ("push", "pull", "step")} for i in range(steps)]


def run_large(
    net: SimNet,
    c: SimCluster,
    mb: float,
    label: str,
    create_kw: dict[str, Any],
    replicas: list[str],
    link: float,
    hosts: dict[int, list[str]],
) -> dict[str, Any]:
    """One worker pushes (committed on a majority) and pulls a `mb` tensor,
    created with `create_kw`: a whole one through the first replica of its
    shard, a partitioned one by the SDK, every part to its shard's leader at
    once. Beside it the plan's push and pull times for one worker with the
    leaders as placed now (the links' limit for this placement) and with the
    bootstrap leaders (what `paramstore plan --partitions K` assumes)."""
    value = np.random.default_rng(1).standard_normal(int(mb * 1e6) // 4, dtype=np.float32)
    name = f"large-{label.replace(' ', '-')}"
    shards = len(hosts)
    entry = hosts[shard_for(name, shards)][0]
    k = int(create_kw.get("partitions", 1))

    def go(client: Client) -> tuple[float, float]:
        client.create(name, value, optimizer={"type": "sgd", "lr": 1e-3}, **create_kw)
        pushes, pulls = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            client.push_grad(name, value)
            pushes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.pull(name)
            pulls.append(time.perf_counter() - t0)
        client.delete(name)
        return min(pushes), min(pulls)

    leaders, _ = net.call("w1", cluster_view, c)
    push_s, pull_s = c.with_client("w1", go, first=entry, timeout=300, deadline=600)
    replication = len(hosts[0])
    # A whole tensor goes to `entry` whoever leads; parts go to their leaders.
    placed = {s: replicas.index(leaders.get(s, hosts[s][0]) if k > 1 else entry) for s in hosts}
    predicted = {}
    for how, lead_at in (("placed", placed), ("bootstrap", None)):
        lead, host = partition_shares(name, value.size, k, len(replicas), shards, replication, lead_at)
        one = Job(
            params=value.size,
            workers=1,
            bandwidth=link,
            step_time=1.0,
            nodes=len(replicas),
            shards=shards,
            replication=replication,
            lead_shares=lead,
            host_shares=host,
        )
        t = ps_timing(one)
        predicted[how] = {"push_s": t.push, "pull_s": t.pull, "lead_shares": lead}
    return {
        "layout": label,
        "partitions": k,
        "bytes": value.nbytes,
        "push_s": push_s,
        "pull_s": pull_s,
        "push_mb_s": value.nbytes / push_s / 1e6,
        "pull_mb_s": value.nbytes / pull_s / 1e6,
        "link_mb_s": link / 1e6,
        "leaders": leaders,
        "predicted": predicted,
    }


def predictions(run: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """`paramstore plan`'s push and pull phases for a run's topology: on the
    links' nominal rate, and on the rates its --measure found (recomputed
    from the saved figures, so a report always uses the current model)."""
    job, measured = nominal_and_measured(run, args)
    return asdict(ps_timing(job)), asdict(ps_timing(measured))


def setup_prediction(run: dict[str, Any], args: argparse.Namespace, setup: Setup) -> dict[str, float]:
    """The plan's push phase with the setup's push compression and pull phase
    with its pull's, on the nominal links and on the measured rates, and the
    bytes one worker sends and receives per step."""
    job, measured = nominal_and_measured(run, args)
    out: dict[str, float] = {}
    for tag, j in (("", job), ("measured_", measured)):
        push = ps_timing(replace(j, compress=setup.plan_push)).push
        pull = ps_timing(replace(j, compress=setup.plan_pull)).pull
        out.update({f"{tag}push": push, f"{tag}pull": pull, f"{tag}total": push + pull})
    out["worker_bytes"] = job.params * (wire(setup.plan_push, job.dtype).push + wire(setup.plan_pull, job.dtype).pull)
    return out


def nominal_and_measured(run: dict[str, Any], args: argparse.Namespace) -> tuple[Job, Job]:
    """The run's job on the links' nominal rate, and on the rates its --measure found."""
    job = job_of(run, args)
    measured = replace(
        job,
        push_bandwidth=effective_push_bandwidth(run["measured_push"], job.replication),
        pull_bandwidth=run["measured_pull"],
    )
    return job, measured


def job_of(run: dict[str, Any], args: argparse.Namespace) -> Job:
    """The job a run measured, as the plan sees it (its real placement)."""
    return Job(
        params=int(args.params) // args.tensors * args.tensors,
        workers=args.workers,
        bandwidth=gbit(args.rate / 1000),
        step_time=1.0,
        nodes=run["nodes"],
        shards=run["shards"],
        replication=run["replication"],
        lead_shares=tuple(run["lead_shares"]),
        host_shares=tuple(run["host_shares"]),
    )


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines: list[str] = []
    jobs = [r for r in runs if "step" in r]
    if jobs:
        lines += [
            f"Job: {args.params:.3g} float32 parameters in {args.tensors} tensors, {args.workers} workers, links "
            f"{runs[0]['shape']['rate_mbit']:g} Mbit/s each way (applied: {runs[0]['applied']['rate_mbit']:g} "
            f"Mbit/s, delay {runs[0]['applied']['delay_ms']:g} ms), replication min(3, nodes), "
            f"{args.steps - 1} timed steps",
            "",
            "| store | measured step (push + pull) | plan, nominal links | measured / plan | plan --measure | "
            "measured / plan --measure | plan's bottleneck | Raft leaders |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in jobs:
        p, pm = predictions(r, args)
        leaders = ", ".join(f"{k}:{v}" for k, v in sorted(r["leaders"].items()))
        lines.append(
            f"| {r['nodes']} nodes | {r['step']:.1f} s ({r['push']:.1f} + {r['pull']:.1f}) | "
            f"{p['total']:.1f} s ({p['push']:.1f} + {p['pull']:.1f}) | {r['step'] / p['total']:.2f}x | "
            f"{pm['total']:.1f} s | {r['step'] / pm['total']:.2f}x | {p['bottleneck']} | {leaders} |"
        )
    # every run with a compressed setup (a run without "none" has no uncompressed row above)
    compressed = [r for r in runs if any(s["setup"] != "none" for s in r.get("setups", []))]
    if compressed:
        lines += [
            "",
            "| store | setup (push/pull) | worker's bytes per step | measured step (push + pull) | "
            "plan, nominal links | measured / plan | plan --measure | measured / plan --measure |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in compressed:
        for res in r["setups"]:
            q = setup_prediction(r, args, parse_setup(res["setup"]))
            lines.append(
                f"| {r['nodes']} nodes | {res['setup']} | {q['worker_bytes'] / 1e6:.1f} MB | {res['step']:.1f} s "
                f"({res['push']:.1f} + {res['pull']:.1f}) | {q['total']:.1f} s ({q['push']:.1f} + {q['pull']:.1f}) | "
                f"{res['step'] / q['total']:.2f}x | {q['measured_total']:.1f} s | "
                f"{res['step'] / q['measured_total']:.2f}x |"
            )
    lines += [
        "",
        "| store | large tensor | push MB/s | limit | of limit | pull MB/s | limit | of limit | "
        "plan (bootstrap leaders) push / pull MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for g in r["large"]:
            if "error" in g:
                lines.append(f"| {r['nodes']} nodes, {r['shards']} shards | {g['layout']} | failed: {g['error']} |")
                continue
            mb = g["bytes"] / 1e6
            placed, boot = g["predicted"]["placed"], g["predicted"]["bootstrap"]
            lim_push, lim_pull = mb / placed["push_s"], mb / placed["pull_s"]
            lines.append(
                f"| {r['nodes']} nodes, {r['shards']} shards | {mb:.0f} MB {g['layout']} | {g['push_mb_s']:.1f} | "
                f"{lim_push:.1f} | {g['push_mb_s'] / lim_push:.0%} | {g['pull_mb_s']:.1f} | {lim_pull:.1f} | "
                f"{g['pull_mb_s'] / lim_pull:.0%} | {mb / boot['push_s']:.1f} / {mb / boot['pull_s']:.1f} |"
            )
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
