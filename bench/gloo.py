"""Issue 14's benchmark: the article's gloo example, scaled.

An MLP of ~10 M float32 parameters learns a fixed random teacher on synthetic
data (fixed seeds: every setup sees the same samples in the same order), 4
worker processes, trained four ways:

    (a) ddp     torch.distributed DDP over gloo on 127.0.0.1 (the article's backend)
    (b) async   through the store: pull params, push grads (3 replicas)
    (c) sync    through the store in synchronous rounds (sync={"workers": 4})
    (d) sync+c  (c) with int8 pulls and top-k 5% pushes (error feedback)

Bytes on the wire are MEASURED per worker: each worker reads the kernel's
TCP_INFO counters (tcpi_bytes_acked + tcpi_bytes_received: TCP payload, no
headers) of every TCP socket it holds, before and after its timed steps, and
of every Python socket it closed in between. Not counted: the replicas'
traffic among themselves (Raft replication of each push to the followers);
their data-path connections are short-lived, so sampling them from outside
(ss) misses most bytes, and the store has no per-peer byte metrics yet.

    python -m bench --only gloo --systems paramstore   # part of make bench
    python -m bench.gloo --steps 4 ...                 # alone
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import struct
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

MB = 1 << 20
SETUPS = ("ddp", "async", "sync", "sync+compress")
LABELS = {
    "ddp": "(a) DDP over gloo",
    "async": "(b) store, async",
    "sync": "(c) store, sync rounds",
    "sync+compress": "(d) (c) + narrow pulls, top-k pushes",
}


@dataclass
class Config:
    workers: int = 4
    steps: int = 10  # per worker; samples = steps * workers * batch
    batch: int = 16  # per worker
    dim_in: int = 256
    hidden: int = 2880  # 256-2880-2880-256: 9.78 M parameters
    dim_out: int = 256
    optimizer: str = "adam"  # or "sgd"; plain SGD hardly moves this MLP in a few steps
    lr: float = 3e-4
    seed: int = 14
    eval_samples: int = 1024
    topk: float = 0.05  # with int8 pulls still <= 0.25x of (c)'s bytes; 1% lags (c)'s loss by 7% after 10 Adam steps
    pull_dtype: str = "int8"  # (d)'s pulls: per-row int8 (a quarter of float32 plus one scale a row)
    async_overlap: bool = False  # (b) pulls while it pushes (the pull then misses the worker's own push)
    topk_warmup: int = 0  # (d)'s first steps push denser top-k (DGC's warm-up), see topk_at
    timeout: float = 600.0  # per worker process

    def params(self) -> int:
        d = [self.dim_in, self.hidden, self.hidden, self.dim_out]
        return sum(a * b + b for a, b in itertools.pairwise(d))


# ------------------------------------------------------------ model, data --


def make_model(cfg: Config) -> Any:
    import torch

    torch.manual_seed(cfg.seed)
    return torch.nn.Sequential(
        torch.nn.Linear(cfg.dim_in, cfg.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(cfg.hidden, cfg.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(cfg.hidden, cfg.dim_out),
    )


def batch(cfg: Config, step: int, rank: int, n: int | None = None) -> tuple[Any, Any]:
    """Worker `rank`'s batch of `step` (rank -1: the evaluation set): x ~ N(0, 1),
    y = tanh(x T1) T2 with a fixed random teacher, so the loss can fall."""
    import torch

    teacher = np.random.default_rng(cfg.seed)
    t1 = teacher.standard_normal((cfg.dim_in, 64)) / np.sqrt(cfg.dim_in)
    t2 = teacher.standard_normal((64, cfg.dim_out)) / np.sqrt(64)
    x = np.random.default_rng([cfg.seed, step + 1, rank + 2]).standard_normal((n or cfg.batch, cfg.dim_in))
    y = np.tanh(x @ t1) @ t2
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))


def eval_loss(cfg: Config, model: Any) -> float:
    import torch

    x, y = batch(cfg, 0, -2, cfg.eval_samples)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def topk_at(cfg: Config, step: int) -> float:
    """(d)'s top-k fraction at `step`: Deep Gradient Compression's warm-up (Lin et
    al. 2018) starts at 25 % and divides the density by 4 each warm-up step, down
    to `cfg.topk`; the residual carries whatever a sparser step leaves behind."""
    if step >= cfg.topk_warmup:
        return cfg.topk
    return max(cfg.topk, 0.25 / 4**step)


def step_grad(cfg: Config, model: Any, step: int, rank: int) -> None:
    import torch

    model.zero_grad(set_to_none=True)
    x, y = batch(cfg, step, rank)
    torch.nn.functional.mse_loss(model(x), y).backward()


# ------------------------------------------------------- measured bytes --


_closed: dict[str, int] = {}  # socket inode -> its counters when this process closed it


def tcp_bytes_of_own_sockets() -> dict[str, int]:
    """{socket inode: payload bytes sent (acked) + received} of this process's TCP
    sockets, open now or closed since `keep_counters_of_closed_sockets`."""
    out = dict(_closed)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            continue
        try:
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            n = _counters(s)
            if n is not None:
                out[target] = n
        finally:
            _close(s)
    return out


def _counters(s: socket.socket) -> int | None:
    if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < 136:
        return None
    acked, received = struct.unpack_from("=QQ", info, 120)  # tcpi_bytes_acked, tcpi_bytes_received
    return int(acked + received)


_close = socket.socket.close


def keep_counters_of_closed_sockets() -> None:
    """Record a Python socket's counters as it closes: the SDK's connection pool
    closes connections beyond its keep-alive limit (parallel part requests), and
    their bytes must still count. gloo's C++ sockets stay open while timed."""

    def close(self: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.fileno() >= 0 and (n := _counters(self)) is not None:
                _closed[f"socket:[{os.fstat(self.fileno()).st_ino}]"] = n
        _close(self)

    socket.socket.close = close  # type: ignore[method-assign]


def delta(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes moved between two snapshots; a socket opened meanwhile counts from 0."""
    return sum(v - before.get(k, 0) for k, v in after.items())


# --------------------------------------------------------------- workers --


def _worker(cfg: Config, rank: int, plan: Any, barrier: Any, q: Any) -> None:
    """Runs the setups `plan` hands it, one after the other (one spawn per
    worker for all four: starting torch costs seconds on a loaded machine)."""
    try:
        import torch

        torch.set_num_threads(1)
        keep_counters_of_closed_sockets()
        while (job := plan.get()) is not None:
            setup, tag, job_cfg, urls, gloo_port = job
            q.put((rank, _train(setup, tag, job_cfg, rank, urls, gloo_port, barrier)))
    except BaseException as e:  # report, never hang the harness
        q.put((rank, {"error": f"{e!r}\n{traceback.format_exc()}"}))
        with contextlib.suppress(Exception):
            barrier.abort()


def _train(
    setup: str, tag: str, cfg: Config, rank: int, urls: list[str], gloo_port: int, barrier: Any
) -> dict[str, Any]:
    import torch

    model = make_model(cfg)
    names = [f"gloo{tag}.{n}" for n, _ in model.named_parameters()]
    params = dict(zip(names, model.parameters(), strict=True))
    if setup == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=cfg.workers)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=cfg.lr)
        step_grad(cfg, ddp, -1, rank)  # connections up and buckets built before the timed steps
        model.zero_grad(set_to_none=True)
        dist.barrier()
        barrier.wait()
        phases = dict.fromkeys(PHASES[setup], 0.0)
        b0, c0, t0 = tcp_bytes_of_own_sockets(), time.process_time(), time.perf_counter()
        for step in range(cfg.steps):
            t = time.perf_counter()
            step_grad(cfg, ddp, step, rank)  # DDP all-reduces the gradient buckets during backward
            t = _lap(phases, "compute+allreduce", t)
            opt.step()
            _lap(phases, "optimizer", t)
        t1, c1, b1 = time.perf_counter(), time.process_time(), tcp_bytes_of_own_sockets()
        barrier.wait()
        loss = eval_loss(cfg, model) if rank == 0 else None
        dist.destroy_process_group()
        return {"t0": t0, "t1": t1, "bytes": delta(b0, b1), "loss": loss, "cpu": c1 - c0, "phases": phases}

    from paramstore import Client

    client = Client(urls, timeout=300, deadline=600)
    sync = setup != "async"
    if rank == 0:
        for n, p in params.items():
            client.create(
                n,
                p.detach().numpy(),
                optimizer={"type": cfg.optimizer, "lr": cfg.lr},
                sync={"workers": cfg.workers, "round_timeout": 600} if sync else None,
            )
    barrier.wait()
    wire = cfg.pull_dtype if setup == "sync+compress" else None
    pulled = _pull(client, names, wire)
    versions = _load(params, pulled)
    barrier.wait()
    phases = dict.fromkeys(PHASES[setup], 0.0)  # seconds, summed over the timed steps
    pool = ThreadPoolExecutor(1) if setup == "async" and cfg.async_overlap else None
    b0, c0, t0 = tcp_bytes_of_own_sockets(), time.process_time(), time.perf_counter()
    for step in range(cfg.steps):
        t = time.perf_counter()
        step_grad(cfg, model, step, rank)
        grads = {n: p.grad.numpy() for n, p in params.items()}
        t = _lap(phases, "compute", t)
        if setup == "async" and pool is not None:
            pulling = pool.submit(_pull, client, names, None)
            client.push_grads(grads)
            t = _lap(phases, "push", t)
            pulled = pulling.result()
            t = _lap(phases, "pull", t)  # what is left of the pull once the push is done
        elif setup == "async":
            client.push_grads(grads)
            t = _lap(phases, "push", t)
            pulled = _pull(client, names, None)
            t = _lap(phases, "pull", t)
        elif setup == "sync":
            pulled = client.sync_step(grads, versions, timeout=600)
            t = _lap(phases, "round", t)
        else:  # top-k with error feedback (the SDK keeps each tensor's residual)
            pulled = client.sync_step(grads, versions, 600, compress=f"topk:{topk_at(cfg, step)}", pull_dtype=wire)
            t = _lap(phases, "round", t)
        versions = _load(params, pulled)
        _lap(phases, "load", t)
    t1, c1, b1 = time.perf_counter(), time.process_time(), tcp_bytes_of_own_sockets()
    if pool is not None:
        pool.shutdown()
    barrier.wait()
    loss = None
    if rank == 0:  # the store's final values, in full precision
        _load(params, _pull(client, names, None))
        loss = eval_loss(cfg, model)
    client.close()
    return {"t0": t0, "t1": t1, "bytes": delta(b0, b1), "loss": loss, "cpu": c1 - c0, "phases": phases}


PHASES = {
    "ddp": ("compute+allreduce", "optimizer"),
    "async": ("compute", "push", "pull", "load"),
    "sync": ("compute", "round", "load"),  # round: push, wait for the 4 workers' round, pull
    "sync+compress": ("compute", "round", "load"),
}


def _lap(phases: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    phases[phase] += now - since
    return now


def _pull(client: Any, names: list[str], wire: str | None) -> dict[str, tuple[np.ndarray, int]]:
    return client.pull_many(names, wire_dtype=wire)  # type: ignore[no-any-return]


def _load(params: dict[str, Any], pulled: dict[str, tuple[np.ndarray, int]]) -> dict[str, int]:
    import torch

    with torch.no_grad():
        for n, (arr, _) in pulled.items():
            params[n].copy_(torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(params[n].shape))
    return {n: v for n, (_, v) in pulled.items()}


def free_base(count: int, low: int = 20000, high: int = 30000) -> int:
    """A base port with base..base+count-1 free now (other benchmarks and test
    clusters share this machine), below the usual ephemeral range."""
    rng = np.random.default_rng()
    for _ in range(500):
        base = int(rng.integers(low, high - count))
        if all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers:
    """`cfg.workers` spawned processes; `run(setup, urls)` trains one setup on all of them."""

    def __init__(self, cfg: Config) -> None:
        ctx = mp.get_context("spawn")
        self.cfg = cfg
        self.plans = [ctx.Queue() for _ in range(cfg.workers)]
        self.q = ctx.Queue()
        self.barrier = barrier = ctx.Barrier(cfg.workers)  # kept: the children rebuild it from its name
        self.procs = [
            ctx.Process(target=_worker, args=(cfg, r, self.plans[r], barrier, self.q), daemon=True)
            for r in range(cfg.workers)
        ]
        for p in self.procs:
            p.start()

    def run(self, setup: str, urls: list[str], cfg: Config | None = None, tag: str | None = None) -> dict[str, Any]:
        """`cfg` overrides the workers' own for this run (a variant); `tag`
        names its tensors apart from other runs' on the same store."""
        cfg = cfg or self.cfg
        port = free_port()
        for plan in self.plans:
            plan.put((setup, tag or str(SETUPS.index(setup)), cfg, urls, port))
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + cfg.timeout
        while len(results) < cfg.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{setup}: workers did not finish in {cfg.timeout:.0f} s")
            try:
                rank, out = self.q.get(timeout=min(left, 2.0))
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"{setup}: a worker process exited ({dead})") from None
                continue
            if "error" in out:
                raise RuntimeError(f"{setup} worker {rank}: {out['error']}")
            results[rank] = out
        wall = max(r["t1"] for r in results.values()) - min(r["t0"] for r in results.values())
        per_worker = [r["bytes"] / cfg.steps for r in results.values()]
        phases = {k: float(np.mean([r["phases"][k] for r in results.values()])) / cfg.steps for k in PHASES[setup]}
        return {
            "steps_s": cfg.steps / wall,
            "seconds": wall,
            "worker_mb_per_step": float(np.mean(per_worker)) / MB,
            "loss": results[0]["loss"],
            "phase_s_per_step": phases,  # each worker's wall time per step in each phase, mean over workers
            "worker_cpu_s_per_step": float(np.mean([r["cpu"] for r in results.values()])) / cfg.steps,
        }

    def close(self, failed: bool = False) -> None:
        for plan in self.plans:
            plan.put(None)
        for p in self.procs:
            p.join(0 if failed else 30)  # a failed setup leaves the others waiting on a barrier or the store
            if p.is_alive():
                p.kill()
                p.join(10)


# ------------------------------------------------------------------ run --


def run(
    cfg: Config, work: Path, log: Any = print, variants: dict[str, tuple[str, dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """Every setup in turn; the store setups share one fresh 3-replica cluster
    (on free ports: other sessions' clusters may hold bench's usual 11000-11117).
    `variants` ({name: (setup, Config overrides)}) re-run a setup with other
    settings after the four, in res["variants"] (for trying levers in one run)."""
    from .systems import Paramstore, cpu_seconds

    res: dict[str, Any] = {"config": {**asdict(cfg), "params": cfg.params()}, "setups": {}, "notes": []}
    log(
        f"gloo: MLP {cfg.params() / 1e6:.2f} M params, {cfg.workers} workers x {cfg.steps} steps x "
        f"batch {cfg.batch} ({cfg.steps * cfg.workers * cfg.batch} samples)"
    )
    res["initial_loss"] = eval_loss(cfg, make_model(cfg))
    t = time.perf_counter()
    workers = Workers(cfg)
    ps, failed = None, True
    try:
        res["setups"]["ddp"] = workers.run("ddp", [])
        log(f"  {LABELS['ddp']}: {_fmt(res['setups']['ddp'])} ({time.perf_counter() - t:.0f} s)")
        base = free_base(3 + 3 * (4 + 2))  # 3 HTTP ports, then each replica's 4 shards + data path + spare
        ps = Paramstore(work, ports=(base, base + 3))
        ps.start()
        urls = [f"http://{h}:{p}" for h, p in ps.urls.values()]
        for setup in SETUPS[1:]:
            t, cpu = time.perf_counter(), cpu_seconds(ps.pids())
            out = workers.run(setup, urls)
            out["replicas_cpu_s_per_step"] = (cpu_seconds(ps.pids()) - cpu) / cfg.steps
            res["setups"][setup] = out
            log(f"  {LABELS[setup]}: {_fmt(out)} ({time.perf_counter() - t:.0f} s)")
        res["variants"] = {}
        for i, (name, (setup, over)) in enumerate((variants or {}).items()):
            if setup in res["setups"]:
                vcfg = replace(cfg, **over)
                t, cpu = time.perf_counter(), cpu_seconds(ps.pids())
                out = workers.run(setup, urls, vcfg, tag=f"v{i}")
                out["replicas_cpu_s_per_step"] = (cpu_seconds(ps.pids()) - cpu) / vcfg.steps
                res["variants"][name] = {"setup": setup, "overrides": over, **out}
                log(f"  {name}: {_fmt(out)} ({time.perf_counter() - t:.0f} s)")
        failed = False
    finally:
        workers.close(failed)
        if ps is not None:
            ps.stop()
    return res


def _label(setup: str, cfg: dict[str, Any]) -> str:
    if setup != "sync+compress":
        return LABELS[setup]
    warmup = f" after {cfg['topk_warmup']} warm-up steps" if cfg.get("topk_warmup") else ""
    return f"(d) (c) + {cfg.get('pull_dtype', 'float16')} pulls, top-k {cfg['topk']:.0%} pushes{warmup}"


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['steps_s']:.2f} steps/s, {r['worker_mb_per_step']:.1f} MB/step/worker, loss {r['loss']:.4f}"


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    base = res["setups"].get("ddp")
    lines = [
        f"MLP {cfg['params'] / 1e6:.2f} M float32 parameters, {cfg['workers']} workers x {cfg['steps']} steps x "
        f"batch {cfg['batch']} = {cfg['steps'] * cfg['workers'] * cfg['batch']} samples, "
        f"{cfg['optimizer']} lr {cfg['lr']} "
        f"(loss before training {res.get('initial_loss', float('nan')):.4f}); "
        "MB (2^20 bytes) per step per worker measured from TCP_INFO of the worker's sockets "
        "(TCP payload sent + received; the replicas' replication traffic among themselves is not counted).",
        "",
        "| setup | steps/s | x (a) | MB/step/worker | x (a) | loss | x (a) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SETUPS:
        r = res["setups"].get(s)
        label = _label(s, cfg)
        if r is None:
            lines.append(f"| {label} | not run | | | | | |")
            continue

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"

        lines.append(
            f"| {label} | {r['steps_s']:.2f} | {ratio('steps_s')} | {r['worker_mb_per_step']:.1f} | "
            f"{ratio('worker_mb_per_step')} | {r['loss']:.4f} | "
            f"{ratio('loss')} |"
        )
    lines += ["", *breakdown(res)]
    for n in res["notes"]:
        lines.append(f"\n{n}")
    return "\n".join(lines)


def breakdown(res: dict[str, Any]) -> list[str]:
    """Where a step's time goes: each phase's wall seconds per step (mean over
    the workers), and the CPU seconds per step of one worker and of all 3 replicas."""
    lines = [
        "| where a step goes | s/step per phase (mean of the workers) | worker CPU s/step | replicas' CPU s/step |",
        "|---|---|---:|---:|",
    ]
    rows = [(s, res["setups"][s]) for s in SETUPS if s in res["setups"]]
    rows += list(res.get("variants", {}).items())
    for name, r in rows:
        if "phase_s_per_step" not in r:  # results from before the breakdown
            continue
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_s_per_step"].items())
        cpu = r.get("replicas_cpu_s_per_step")
        lines.append(
            f"| {name} | {phases} (step {1 / r['steps_s']:.2f}) | {r['worker_cpu_s_per_step']:.2f} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gloo", description=__doc__)
    d = Config()
    for k, v in asdict(d).items():
        if isinstance(v, bool):
            ap.add_argument(f"--{k.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=v)
        else:
            ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in asdict(d)})
    work = Path(tempfile.mkdtemp(prefix="paramstore-gloo-"))
    try:
        res = run(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
