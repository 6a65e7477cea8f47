"""Asynchronous data-parallel SGD through a paramstore cluster.

N worker processes share one model stored in the cluster. Each worker loops:
pull the parameters, compute a minibatch gradient in numpy, push it with the
version it was computed on; the store applies it with a server-side optimizer.
No worker waits for another (asynchronous SGD, as in a parameter server).

With --sync the store runs synchronous rounds instead (TF's
SyncReplicasOptimizer): each step, the store averages the N workers'
gradients for the same version and applies the optimizer once, so the run
computes what data-parallel SGD with batch N x --batch computes.

    python -m api.cli dev --then "python examples/train_digits.py" --exit-after
    python -m api.cli dev --then "python examples/train_digits.py --sync" --exit-after
    python examples/train_digits.py --urls http://127.0.0.1:8700,http://127.0.0.1:8701

Data: scikit-learn's bundled 8x8 digits if scikit-learn is importable, else a
generated 10-class problem of the same size (the output says which). Model:
softmax regression, or a one-hidden-layer MLP with --hidden N. Exits 1 if the
final test accuracy is below --target.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paramstore import Client, NotFoundError

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]


def load_data(seed: int = 0) -> Data:
    """(x_train, y_train, x_test, y_test, description); a fixed 75/25 split."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, what = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64), "scikit-learn digits"
    except ImportError:
        rng = np.random.default_rng(1234)
        centers = rng.uniform(0, 1, (10, 64)).astype(np.float32)
        y = rng.integers(0, 10, 1797)
        x = np.clip(centers[y] + rng.normal(0, 0.25, (1797, 64)), 0, 1).astype(np.float32)
        what = "generated data (scikit-learn not installed)"
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.75 * len(x))
    tr, te = order[:cut], order[cut:]
    return x[tr], y[tr], x[te], y[te], what


def init_params(n_in: int, hidden: int, n_out: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [n_in, hidden, n_out] if hidden else [n_in, n_out]
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"W{i}"] = (rng.normal(0, 1 / np.sqrt(a), (a, b))).astype(np.float32)
        params[f"b{i}"] = np.zeros(b, np.float32)
    return params


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the input of each layer."""
    layers = len(params) // 2
    inputs, h = [], x
    for i in range(layers):
        inputs.append(h)
        h = h @ params[f"W{i}"] + params[f"b{i}"]
        if i < layers - 1:
            h = np.maximum(h, 0)
    return h, inputs


def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, float, dict[str, np.ndarray]]:
    """Mean cross-entropy, accuracy, and the gradient of every parameter."""
    logits, inputs = forward(params, x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    acc = float((logits.argmax(axis=1) == y).mean())
    d = p
    d[np.arange(n), y] -= 1
    d /= n
    grads = {}
    for i in reversed(range(len(inputs))):
        grads[f"W{i}"] = (inputs[i].T @ d).astype(np.float32)
        grads[f"b{i}"] = d.sum(axis=0).astype(np.float32)
        if i:
            d = (d @ params[f"W{i}"].T) * (inputs[i] > 0)
    return loss, acc, grads


def evaluate(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    loss, acc, _ = loss_and_grads(params, x, y)
    return loss, acc


def worker(rank: int, args: argparse.Namespace, urls: list[str], results: mp.Queue) -> None:
    """Pull, compute, push, `args.steps` times; reports (rank, loss, pushes) every few steps."""
    x, y, _, _, _ = load_data()
    rng = np.random.default_rng(1000 + rank)
    names = {k: f"{args.prefix}.{k}" for k in init_params(x.shape[1], args.hidden)}
    # Spread the workers' reads over the replicas; any replica takes writes.
    with Client(urls[rank % len(urls) :] + urls[: rank % len(urls)]) as ps:
        optimizer = {"type": args.optimizer, "lr": args.lr}
        sync = (
            {"workers": args.workers, "backup_workers": args.backup_workers, "round_timeout": args.round_timeout}
            if args.sync
            else None
        )
        for key, value in init_params(x.shape[1], args.hidden).items():
            ps.create(names[key], value, optimizer=optimizer, exist_ok=True, sync=sync)  # first worker wins
        pushes, losses = 0, []
        wire_dtype = None if args.pull_dtype == "float32" else args.pull_dtype
        pulled = ps.pull_many(names.values(), wire_dtype=wire_dtype)
        for step in range(args.steps):
            params = {k: pulled[n][0] for k, n in names.items()}
            idx = rng.integers(0, len(x), args.batch)
            loss, _, grads = loss_and_grads(params, x[idx], y[idx])
            pushed = {names[k]: g for k, g in grads.items()}
            versions = {n: pulled[n][1] for n in names.values()}
            if args.sync:  # push into this version's round, wait for it to close, get the new values
                pulled = ps.sync_step(pushed, versions, compress=args.compress, pull_dtype=wire_dtype)
            else:
                if args.compress:  # top-k is per tensor (its residual too): one push each
                    for n, g in pushed.items():
                        ps.push_grad(n, g, base_version=versions[n], compress=args.compress)
                else:
                    ps.push_grads(pushed, base_versions=versions)
                pulled = ps.pull_many(names.values(), wire_dtype=wire_dtype)
            pushes += len(grads)
            losses.append(loss)
            if (step + 1) % 10 == 0 or step + 1 == args.steps:
                results.put((rank, float(np.mean(losses)), pushes, len(losses)))
                pushes, losses = 0, []
    results.put((rank, None, 0, 0))


def pull_params(ps: Client, prefix: str, hidden: int, n_in: int) -> dict[str, np.ndarray]:
    keys = list(init_params(n_in, hidden))
    return {k: ps.pull(f"{prefix}.{k}")[0] for k in keys}


class Progress:
    """tqdm if installed, else a plain line about once a second."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.last = total, 0, 0.0
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
        elif time.monotonic() - self.last > 1.0 or self.done == self.total:
            self.last = time.monotonic()
            print(f"  step {self.done}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--urls",
        default=os.environ.get("PARAMSTORE_URLS", "http://127.0.0.1:8700"),
        help="comma-separated replica URLs (default: $PARAMSTORE_URLS)",
    )
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=150, help="gradient steps per worker")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=0, help="hidden units (0: softmax regression)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "adagrad"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default 0.5 for sgd, 0.01 otherwise")
    p.add_argument("--prefix", default="digits", help="tensor name prefix")
    p.add_argument("--resume", action="store_true", help="keep stored tensors instead of starting over")
    p.add_argument("--sync", action="store_true", help="synchronous rounds: one averaged update per step")
    p.add_argument("--backup-workers", type=int, default=0, help="with --sync: close a round after N - this many")
    p.add_argument("--round-timeout", type=float, default=30.0, help="with --sync: close a round after this long")
    p.add_argument("--target", type=float, default=0.90, help="exit 1 below this test accuracy")
    p.add_argument(
        "--pull-dtype",
        choices=["float32", "float16", "bfloat16", "int8"],
        default="float32",
        help="wire dtype of the parameters the workers pull (the store keeps float32)",
    )
    p.add_argument(
        "--compress", default=None, help="topk:F sends the largest fraction F of each gradient (error feedback)"
    )
    args = p.parse_args(argv)
    if args.compress is not None:
        kind, _, fraction = args.compress.partition(":")
        try:
            ok = kind == "topk" and 0 < float(fraction) <= 1
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--compress {args.compress!r}: expected topk:F with F in (0, 1], e.g. topk:0.01")
    if args.lr is None:
        args.lr = 0.5 if args.optimizer == "sgd" else 0.01
    urls = [u.strip() for u in args.urls.split(",") if u.strip()]

    x_tr, _, x_te, y_te, what = load_data()
    n_in = x_tr.shape[1]
    model = f"MLP 64-{args.hidden}-10" if args.hidden else "softmax regression 64-10"
    print(
        f"data: {what}, {len(x_tr)} train / {len(x_te)} test; model: {model}; "
        f"{args.workers} workers x {args.steps} steps, batch {args.batch}, "
        f"server-side {args.optimizer} lr {args.lr}"
        + (", synchronous rounds" if args.sync else "")
        + f"; pulls {args.pull_dtype}, pushes {args.compress or 'dense'}",
        flush=True,
    )
    with Client(urls) as ps:
        if not args.resume:
            for k in init_params(n_in, args.hidden):
                with contextlib.suppress(NotFoundError):
                    ps.delete(f"{args.prefix}.{k}")
        ctx = mp.get_context("spawn")  # no inherited sockets or threads
        results: mp.Queue = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, args, urls, results), daemon=True) for r in range(args.workers)]
        start = time.monotonic()
        for proc in procs:
            proc.start()
        progress = Progress(args.workers * args.steps)
        running, pushes, loss, test_acc, last_eval = args.workers, 0, float("nan"), float("nan"), 0.0
        try:
            while running:
                try:
                    _rank, batch_loss, n_pushes, n_steps = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [pr for pr in procs if pr.exitcode not in (None, 0)]
                    if dead:
                        print(f"error: worker exited with {dead[0].exitcode}", file=sys.stderr)
                        return 2
                    continue
                if batch_loss is None:
                    running -= 1
                    continue
                pushes += n_pushes
                loss = batch_loss
                if time.monotonic() - last_eval > 1.0:
                    last_eval = time.monotonic()
                    _, test_acc = evaluate(pull_params(ps, args.prefix, args.hidden, n_in), x_te, y_te)
                rate = pushes / (time.monotonic() - start)
                progress.update(
                    n_steps, {"loss": f"{loss:.3f}", "test_acc": f"{test_acc:.3f}", "pushes/s": f"{rate:.0f}"}
                )
        finally:
            progress.close()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
        seconds = time.monotonic() - start
        failed = [pr.exitcode for pr in procs if pr.exitcode != 0]
        if failed:
            print(f"error: workers exited with {failed}", file=sys.stderr)
            return 2
        test_loss, test_acc = evaluate(pull_params(ps, args.prefix, args.hidden, n_in), x_te, y_te)
    print(
        f"final: test accuracy {test_acc:.4f}, test loss {test_loss:.4f}, "
        f"{pushes} pushes in {seconds:.1f} s ({pushes / seconds:.1f} pushes/s), data: {what}"
    )
    if test_acc < args.target:
        print(f"FAILED: test accuracy {test_acc:.4f} is below the target {args.target:.2f}", file=sys.stderr)
        return 1
    print(f"OK: test accuracy {test_acc:.4f} >= {args.target:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
