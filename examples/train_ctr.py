"""Click-through-rate training with embedding tables in a paramstore cluster.

A synthetic click log with a known ground truth: 8 feature fields, each a
Zipf-distributed ID out of 2^17 (over 1 M distinct IDs in all), and a click
label drawn from a hidden logistic model over the IDs' true weights. The model:
each field's ID through a `StoreEmbeddingBag` (dim 16, rows in the table
"ctr.emb", row-wise Adagrad in the store) and a small MLP over the 8
embeddings (tensors "ctr.mlp.*", Adam in the store). N worker processes
train it asynchronously: each step looks up its batch's rows (worker cache,
prefetch), pulls the MLP, and pushes row and MLP gradients.

The same model is then trained in one process with plain torch
(`torch.nn.EmbeddingBag` + Adagrad, MLP + Adam) on the same batches; the run
fails (exit 1) unless the store-trained model's held-out AUC is within
--tolerance (0.02) of that reference.

    make run-ctr            # a local 3-replica cluster, then this with 4 workers
    python examples/train_ctr.py --urls http://127.0.0.1:8700 --short
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paramstore import Client, NotFoundError
from paramstore.torch import PrefetchingLoader, StoreEmbeddingBag

TABLE = "ctr.emb"
PREFIX = "ctr.mlp."


@dataclass(frozen=True)
class Setup:
    fields: int = 8
    vocab: int = 1 << 17  # IDs per field: 8 x 131,072 = 1,048,576 distinct IDs
    zipf: float = 1.15
    dim: int = 16
    hidden: int = 64
    batch: int = 512
    steps: int = 300  # per worker
    workers: int = 4
    test: int = 20_000
    lr_emb: float = 0.05
    lr_mlp: float = 0.003
    cache_rows: int = 200_000
    max_staleness: int = 32
    in_flight: int = 2
    prefetch: bool = True
    seed: int = 0


SHORT = {"steps": 40, "test": 8_000}


# ---- the synthetic click log -------------------------------------------------------------
def true_weights(s: Setup) -> np.ndarray:
    """The hidden logistic model: one weight per (field, rank)."""
    return np.random.default_rng(s.seed + 1).normal(0.0, 0.8, (s.fields, s.vocab)).astype(np.float32)


def click_batch(s: Setup, weights: np.ndarray, stream: int, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranks (n x fields) in [0, vocab), labels (n)); the same for the same (stream, step)."""
    rng = np.random.default_rng([s.seed, stream, step])
    ranks = (rng.zipf(s.zipf, (n, s.fields)) - 1) % s.vocab
    logit = weights[np.arange(s.fields), ranks].sum(axis=1) - 0.5
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return ranks, labels


def table_ids(ranks: np.ndarray) -> np.ndarray:
    """64-bit table IDs: the field in the high bits, the rank scrambled below it."""
    fields = np.arange(ranks.shape[1], dtype=np.int64)
    scrambled = (ranks.astype(np.int64) * 2654435761) % (1 << 32)
    return (fields << 40) | scrambled


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---- the model ---------------------------------------------------------------------------
def make_mlp(s: Setup) -> torch.nn.Sequential:
    torch.manual_seed(s.seed)
    return torch.nn.Sequential(
        torch.nn.Linear(s.fields * s.dim, s.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(s.hidden, s.hidden // 2),
        torch.nn.ReLU(),
        torch.nn.Linear(s.hidden // 2, 1),
    )


class CTRModel(torch.nn.Module):
    """Per-field embeddings (one bag of one ID per field) concatenated into an MLP."""

    def __init__(self, emb: torch.nn.Module, mlp: torch.nn.Sequential, fields: int, dim: int) -> None:
        super().__init__()
        self.emb, self.mlp, self.fields, self.dim = emb, mlp, fields, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids.reshape(-1, 1))  # (batch * fields, dim)
        return self.mlp(e.reshape(-1, self.fields * self.dim)).reshape(-1)


# ---- workers -----------------------------------------------------------------------------
def pull_mlp(ps: Client, mlp: torch.nn.Module) -> None:
    params = dict(mlp.named_parameters())
    pulled = ps.pull_many([PREFIX + n for n in params])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(np.array(pulled[PREFIX + n][0])).reshape(p.shape))


def worker(rank: int, s: Setup, urls: list[str], out: Any) -> None:
    torch.set_num_threads(1)
    weights = true_weights(s)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    try:
        with Client(urls, timeout=10.0, deadline=60.0) as ps:
            emb = StoreEmbeddingBag(
                ps,
                TABLE,
                mode="sum",
                cache_rows=s.cache_rows,
                max_staleness=s.max_staleness,
                max_in_flight=s.in_flight,
            )
            mlp = make_mlp(s)
            model = CTRModel(emb, mlp, s.fields, s.dim)
            batches = (
                (torch.from_numpy(table_ids(r)), torch.from_numpy(y))
                for r, y in (click_batch(s, weights, rank, step, s.batch) for step in range(s.steps))
            )
            loader = PrefetchingLoader(batches, emb, ids_of=lambda b: b[0]) if s.prefetch and s.cache_rows else batches
            for ids, labels in loader:
                pull_mlp(ps, mlp)
                logits = model(ids)
                loss = loss_fn(logits, labels)
                mlp.zero_grad()
                loss.backward()  # pushes the embedding rows' gradients
                ps.push_grads({PREFIX + n: p.grad.numpy() for n, p in mlp.named_parameters() if p.grad is not None})
                out.put(("step", rank, loss.item(), logits.detach().numpy(), labels.numpy(), emb.stats()))
            emb.flush()
            out.put(("done", rank, emb.stats()))
            emb.close()
    except BaseException as e:
        out.put(("error", rank, f"{type(e).__name__}: {e}"))
        raise


# ---- progress ----------------------------------------------------------------------------
class Progress:
    """tqdm if installed, else a plain line about once a second."""

    def __init__(self, total: int, show: bool = True) -> None:
        self.total, self.done, self.last, self.show = total, 0, 0.0, show
        self.bar: Any = None
        if not show:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def update(self, steps: int, info: dict[str, str]) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(info, refresh=False)
        elif self.show and (time.monotonic() - self.last > 1.0 or self.done == self.total):
            self.last = time.monotonic()
            print(f"  step {self.done}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the store-trained run ---------------------------------------------------------------
def reset_store(ps: Client, s: Setup) -> None:
    """A fresh table and MLP (the MLP starts from the reference's initial values)."""
    with contextlib.suppress(NotFoundError):
        ps.delete_table(TABLE)
    ps.create_table(
        TABLE,
        dim=s.dim,
        initializer={"type": "normal", "std": 0.01, "seed": s.seed},
        optimizer={"type": "adagrad", "lr": s.lr_emb},
    )
    for n, p in make_mlp(s).named_parameters():
        with contextlib.suppress(NotFoundError):
            ps.delete(PREFIX + n)
        ps.create(PREFIX + n, p.detach().numpy(), optimizer={"type": "adam", "lr": s.lr_mlp})


def train_on_store(s: Setup, urls: list[str], show: bool = True) -> dict[str, Any]:
    """Train with `s.workers` processes; the held-out AUC, steady samples/s
    (first step to last, without process start-up) and the workers' figures."""
    with Client(urls, timeout=10.0, deadline=60.0) as ps:
        reset_store(ps, s)
        # forkserver: no inherited sockets or threads, and torch is imported once, not per worker
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "paramstore.torch"])
        out: Any = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, s, urls, out), daemon=True) for r in range(s.workers)]
        start = time.monotonic()
        for p in procs:
            p.start()
        bar = Progress(s.workers * s.steps, show)
        recent: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=40)
        stats: dict[int, dict[str, float]] = {}
        loss_avg, rows, rows_at, done, first_step, last_step = 0.0, 0, 0.0, 0, 0.0, 0.0
        try:
            while done < s.workers:
                try:
                    msg = out.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"worker exited with {dead[0].exitcode}") from None
                    continue
                if msg[0] == "error":
                    raise RuntimeError(f"worker {msg[1]} failed: {msg[2]}")
                if msg[0] == "done":
                    done += 1
                    stats[msg[1]] = msg[2]
                    continue
                _, rank, loss, scores, labels, st = msg
                first_step = first_step or time.monotonic()
                last_step = time.monotonic()
                stats[rank] = st
                recent.append((labels, scores))
                loss_avg = loss if bar.done == 0 else 0.98 * loss_avg + 0.02 * loss
                if time.monotonic() - rows_at > 1.0:
                    rows, rows_at = ps.table_info(TABLE)["rows"], time.monotonic()
                pushes = sum(x["pushes"] for x in stats.values())
                hits = sum(x["hits"] for x in stats.values())
                lookups = hits + sum(x["misses"] for x in stats.values())
                y = np.concatenate([r[0] for r in recent])
                p = np.concatenate([r[1] for r in recent])
                bar.update(
                    1,
                    {
                        "loss": f"{loss_avg:.4f}",
                        "auc": f"{auc(y, p):.3f}",  # progressive: each batch scored before it trains
                        "rows": f"{rows:,}",
                        "hit": f"{hits / max(1, lookups):.0%}",
                        "push/s": f"{pushes / max(1e-9, time.monotonic() - first_step):.0f}",
                    },
                )
        finally:
            bar.close()
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.terminate()
        seconds = time.monotonic() - start
        emb = StoreEmbeddingBag(ps, TABLE, mode="sum")
        emb.eval()
        mlp = make_mlp(s)
        pull_mlp(ps, mlp)
        test_auc = evaluate(CTRModel(emb, mlp, s.fields, s.dim), s, table_ids)
        emb.close()
        steady = (s.workers * s.steps - 1) * s.batch / max(1e-9, last_step - first_step)
        return {
            "auc": test_auc,
            "seconds": seconds,
            "samples_per_s": steady,
            "rows": ps.table_info(TABLE)["rows"],
            "stats": stats,
        }


def evaluate(model: torch.nn.Module, s: Setup, ids_of: Any) -> float:
    ranks, labels = click_batch(s, true_weights(s), 1_000_000, 0, s.test)  # a stream no worker trains on
    with torch.no_grad():
        scores = np.concatenate(
            [model(torch.from_numpy(ids_of(ranks[i : i + 4096]))).numpy() for i in range(0, s.test, 4096)]
        )
    return auc(labels, scores)


# ---- the one-process reference ------------------------------------------------------------
def local_index(s: Setup) -> Any:
    return lambda ranks: (np.arange(s.fields, dtype=np.int64) * s.vocab + ranks).astype(np.int64)


def train_locally(s: Setup) -> dict[str, Any]:
    """The same model and batches, torch.nn.EmbeddingBag + Adagrad and MLP + Adam, one process."""
    torch.set_num_threads(1)  # one core, like each worker (two threads on a busy 2-core machine thrash)
    weights = true_weights(s)
    torch.manual_seed(s.seed + 2)
    emb = torch.nn.EmbeddingBag(s.fields * s.vocab, s.dim, mode="sum", sparse=True)
    torch.nn.init.normal_(emb.weight, 0.0, 0.01)
    mlp = make_mlp(s)
    model = CTRModel(emb, mlp, s.fields, s.dim)
    opt_emb = torch.optim.Adagrad(emb.parameters(), lr=s.lr_emb)
    opt_mlp = torch.optim.Adam(mlp.parameters(), lr=s.lr_mlp)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    index = local_index(s)
    # torch's sparse Adagrad warns about its own sparse tensors' invariant checks on every step
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    start = time.monotonic()
    for step in range(s.steps):
        for rank in range(s.workers):  # the workers' batches, interleaved
            ranks, labels = click_batch(s, weights, rank, step, s.batch)
            loss = loss_fn(model(torch.from_numpy(index(ranks))), torch.from_numpy(labels))
            opt_emb.zero_grad()
            opt_mlp.zero_grad()
            loss.backward()
            opt_emb.step()
            opt_mlp.step()
    seconds = time.monotonic() - start
    samples = s.workers * s.steps * s.batch
    return {"auc": evaluate(model, s, index), "seconds": seconds, "samples_per_s": samples / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--urls",
        default=os.environ.get("PARAMSTORE_URLS", "http://127.0.0.1:8700"),
        help="comma-separated replica URLs (default: $PARAMSTORE_URLS)",
    )
    p.add_argument("--short", action="store_true", help=f"a short run for CI: {SHORT}")
    p.add_argument("--workers", type=int, default=Setup.workers)
    p.add_argument("--steps", type=int, default=None, help=f"steps per worker (default {Setup.steps})")
    p.add_argument("--batch", type=int, default=Setup.batch)
    p.add_argument("--cache-rows", type=int, default=Setup.cache_rows, help="worker row cache (0: none)")
    p.add_argument("--max-staleness", type=int, default=Setup.max_staleness, help="cache bound, in versions")
    p.add_argument("--in-flight", type=int, default=Setup.in_flight, help="row pushes in flight (0: synchronous)")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.02, help="exit 1 if AUC is further from the reference")
    args = p.parse_args(argv)
    fields: dict[str, Any] = dict(SHORT) if args.short else {}
    if args.steps is not None:
        fields["steps"] = args.steps
    s = Setup(
        workers=args.workers,
        batch=args.batch,
        cache_rows=args.cache_rows,
        max_staleness=args.max_staleness,
        in_flight=args.in_flight,
        prefetch=not args.no_prefetch,
        **fields,
    )
    urls = [u for u in args.urls.split(",") if u]
    samples = s.workers * s.steps * s.batch
    print(
        f"click log: {s.fields} fields x {s.vocab:,} IDs (Zipf {s.zipf}), {samples:,} training samples, "
        f"{s.test:,} held out; {s.workers} workers against {', '.join(urls)}",
        flush=True,
    )
    store = train_on_store(s, urls)
    st = store["stats"]
    fetched = sum(x["rows_fetched"] for x in st.values())
    steps = s.workers * s.steps
    print(
        f"store: held-out AUC {store['auc']:.4f} in {store['seconds']:.1f} s "
        f"({store['samples_per_s']:,.0f} samples/s once started), {store['rows']:,} rows in the table, "
        f"{fetched / steps:,.0f} rows fetched per step",
        flush=True,
    )
    print("reference: the same model and batches in one process with torch.nn.EmbeddingBag ...", flush=True)
    ref = train_locally(s)
    print(
        f"reference: held-out AUC {ref['auc']:.4f} in {ref['seconds']:.1f} s ({ref['samples_per_s']:,.0f} samples/s)",
        flush=True,
    )
    gap = abs(store["auc"] - ref["auc"])
    if gap > args.tolerance:
        print(
            f"FAILED: the store-trained AUC {store['auc']:.4f} is {gap:.4f} from the reference {ref['auc']:.4f} "
            f"(tolerance {args.tolerance})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"OK: AUC within {gap:.4f} of the one-process reference (tolerance {args.tolerance})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
