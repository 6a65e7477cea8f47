"""The side-by-side table, the targets, the plot, and docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def _cell(s: dict | None, fmt: str = "{:.0f}") -> str:
    if not s:
        return "–"
    if s.get("median") is None:
        return s.get("error", "failed").replace("|", "/")[:70]
    m, lo, hi = s["median"], s["min"], s["max"]
    if lo == hi:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"


def _ratio(ps: dict | None, other: dict | None, lower_better: bool = False) -> float | None:
    if not ps or not other or ps.get("median") is None or other.get("median") in (None, 0):
        return None
    return other["median"] / ps["median"] if lower_better else ps["median"] / other["median"]


def _ratios(ps, row: dict, peers: list[str], lower_better=False) -> str:
    out = []
    for p in peers:
        r = _ratio(ps, row.get(p), lower_better)
        if r is not None:
            out.append(f"{r:.2f}× {p}")
    return ", ".join(out) or "–"


SMALL = ["paramstore", "paramstore-nofsync", "etcd", "etcd-tmpfs", "redis WAIT 2", "redis plain", "pysyncobj"]
# (ours, peer): each ratio names its pair. Durable with durable: paramstore (journal
# fdatasynced) ÷ etcd with its data dir on the same disk; neither syncing to a disk:
# paramstore-nofsync ÷ etcd on tmpfs; Redis does not persist, raw pysyncobj is the floor.
SMALL_PAIRS = [
    ("paramstore", "etcd"),
    ("paramstore-nofsync", "etcd-tmpfs"),
    ("paramstore", "redis WAIT 2"),
    ("paramstore-nofsync", "redis WAIT 2"),
    ("paramstore", "pysyncobj"),
]
PULL = ["paramstore", "etcd", "redis", "loopback TCP"]
PUSH = [
    "paramstore",
    "paramstore (majority ack)",
    "paramstore-nofsync",
    "etcd (default limit)",
    "etcd (limit raised)",
    "etcd-tmpfs (limit raised)",
    "redis WAIT 2",
    "redis plain",
    "pysyncobj",
]
PUSH_PAIRS = [
    ("paramstore", "etcd (limit raised)"),
    ("paramstore-nofsync", "etcd-tmpfs (limit raised)"),
    ("paramstore", "redis WAIT 2"),
    ("paramstore-nofsync", "redis WAIT 2"),
]


def _pair_ratios(row: dict, pairs: list[tuple[str, str]], lower_better: bool = False) -> str:
    out = []
    for ours, peer in pairs:
        r = _ratio(row.get(ours), row.get(peer), lower_better)
        if r is not None:
            out.append(f"{ours} ÷ {peer} {r:.2f}×")
    return "; ".join(out) or "–"


def _table(
    title: str, cols: list[str], rows: list[tuple[str, dict, str]], fmt="{:.0f}", ratio_head="paramstore ÷ peer"
) -> list[str]:
    lines = [f"**{title}**", "", "| | " + " | ".join(cols) + f" | {ratio_head} |", "|---" * (len(cols) + 2) + "|"]
    for label, row, ratios in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(c), fmt) for c in cols) + f" | {ratios} |")
    return [*lines, ""]


def targets(res: dict) -> list[tuple[str, bool | None, str]]:
    out = []

    def med(d, *keys):
        for k in keys:
            d = (d or {}).get(k)
        return (d or {}).get("median")

    pairs = (("paramstore", "etcd", 1.0), ("paramstore-nofsync", "etcd-tmpfs", 1.0), ("paramstore", "pysyncobj", 0.5))
    for ours, peer, want in pairs:
        mine, other = med(res["small"], ours, "64", "ops_s"), med(res["small"], peer, "64", "ops_s")
        r = mine / other if mine and other else None
        out.append(
            (
                f"small pushes @64 clients: {ours} ≥ {want}× {peer}",
                None if r is None else r >= want,
                "not measured" if r is None else f"{r:.2f}×",
            )
        )
    for ours, peer, _ in pairs[:2]:
        cpu, cpu_peer = med(res["small"], ours, "64", "cpu_us"), med(res["small"], peer, "64", "cpu_us")
        if cpu and cpu_peer:
            out.append(
                (
                    f"CPU per small push @64 clients: {ours} ≤ {peer}'s",
                    cpu <= cpu_peer,
                    f"{cpu:.0f} vs {cpu_peer:.0f} µs ({cpu / cpu_peer:.2f}×)",
                )
            )
    pull = med(res["pull"], "paramstore", "64")
    for peer, want in ((IPERF1, 0.5), ("redis", 1.0)):
        other = med(res.get("limits"), peer) if peer == IPERF1 else med(res["pull"], peer, "64")
        r = pull / other if pull and other else None
        out.append(
            (
                f"pull 64 MB from a follower ≥ {want}× {peer}",
                None if r is None else r >= want,
                "not measured" if r is None else f"{r:.2f}×",
            )
        )
    for mb in ("16", "64"):
        p, o = med(res["push"], "paramstore", mb), med(res["push"], "redis WAIT 2", mb)
        r = p / o if p and o else None
        out.append(
            (
                f"push {mb} MB ≥ 1.0× redis SET+WAIT 2",
                None if r is None else r >= 1.0,
                "not measured" if r is None else f"{r:.2f}×",
            )
        )
    m = res["memory"].get("paramstore")
    if m:
        worst = max(m["peak_rss_mb"].values())
        out.append(
            (
                f"peak RSS ≤ 2.5× held + 200 MB (held {m['held_mb']} MB → ≤ {m['target_mb']:.0f} MB)",
                worst <= m["target_mb"],
                f"worst replica {worst:.0f} MB = {worst / m['held_mb']:.2f}× held",
            )
        )
    f = res["failover"].get("paramstore")
    if f and f.get("median") is not None:
        runs = sorted(x if x is not None else float("inf") for x in f["runs"])
        p99 = runs[min(len(runs) - 1, int(0.99 * len(runs)))]
        out.append(("failover median ≤ 0.6 s", f["median"] <= 0.6, f"{f['median']:.2f} s over {len(runs)} kills"))
        out.append(("failover p99 ≤ 1.0 s", p99 <= 1.0, f"{p99:.2f} s"))
    spurious = {s: sum(v for v in d.values() if v) for s, d in res["elections"].items()}
    if "paramstore" in spurious:
        out.append(
            (
                "no spurious leader elections (paramstore)",
                spurious["paramstore"] == 0,
                ", ".join(f"{s}: {n}" for s, n in spurious.items()),
            )
        )
    return out


IPERF1 = "loopback TCP, iperf3 1 stream (MB/s)"
DISK = "disk sequential write, fio 1 MB blocks (MB/s)"
SYNCS = "disk fdatasync rate, fio 4 KB appends (syncs/s)"
MEMCPY = "memcpy, numpy, one core (MB/s)"


def _limits(res: dict) -> list[str]:
    """The machine's limits and each workload's figure as a fraction of them."""
    lim = res.get("limits") or {}
    if not lim:
        return []
    lines = ["**Limits of this machine, measured in the same run**", "", "| limit | figure |", "|---|---|"]
    lines += [f"| {name} | {_cell(v, '{:.0f}')} |" for name, v in lim.items()]

    def med(d: dict | None) -> float | None:
        return (d or {}).get("median")

    def get(section: str, system: str, key: str) -> float | None:
        return med((res[section].get(system) or {}).get(key))

    top = str(max(res["config"]["sizes"]))
    many = str(max(res["config"]["clients"]))
    disk3 = med(lim.get(DISK)) and med(lim.get(DISK)) / 3  # three replicas write every payload to this one disk
    rows = [
        (f"pull {top} MB from a follower, MB/s", get("pull", "paramstore", top), [(IPERF1, None), (MEMCPY, None)]),
        (f"redis GET {top} MB, MB/s", get("pull", "redis", top), [(IPERF1, None)]),
        (
            f"push {top} MB on 3 replicas, MB/s",
            get("push", "paramstore", top),
            [(IPERF1, None), ("disk sequential write ÷ 3 (three replicas, one disk)", disk3)],
        ),
        (
            f"push {top} MB on 3 replicas, fsync off, MB/s",
            get("push", "paramstore-nofsync", top),
            [(IPERF1, None), ("disk sequential write ÷ 3 (three replicas, one disk)", disk3)],
        ),
        (f"redis SET+WAIT 2 {top} MB, MB/s", get("push", "redis WAIT 2", top), [(IPERF1, None)]),
        (
            f"small pushes @{many} clients, ops/s",
            med(((res["small"].get("paramstore") or {}).get(many) or {}).get("ops_s")),
            [(SYNCS, None)],
        ),
    ]
    lines += ["", "| workload | figure | ÷ limit |", "|---|---|---|"]
    for label, value, against in rows:
        if value is None:
            continue
        parts = []
        for name, fixed in against:
            limit = fixed if fixed is not None else med(lim.get(name))
            if limit:
                parts.append(f"{value / limit:.2f}× {name}")
        lines.append(f"| {label} | {value:.0f} | {', '.join(parts) or '–'} |")
    lines += [
        "",
        "Small pushes may pass the fdatasync rate: group commit syncs one journal batch for many writes.",
        "",
    ]
    return lines


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"Run {res['started']} on {m['cpu']}, {m['cores']} cores, {m['mem_mb']} MB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; {m['etcd']}; {m['redis']}; load average at start {m['load_avg_at_start']}"
        f"{', at end ' + str(res['load_avg_at_end']) if res.get('load_avg_at_end') else ''}. "
        f"Took {res.get('seconds', 0):.0f} s. Figures: median (min–max) of {res['config']['reps']} runs.",
        "",
    ]
    if any(res[k] for k in ("small", "pull", "push", "failover")):
        lines += [
            "Failover, small writes, pulls and pushes ran with every system up at once and their repetitions "
            "interleaved (repetition r runs each system once, the order rotated by r: A B C, B C A, ...), so that "
            "drift in the machine's load hits every system alike; each ratio names the pair it compares.",
            "",
        ]
    sec = res.get("section_seconds") or {}
    if sec:
        lines += [
            "Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + ".",
            "",
        ]
    for n in res.get("notes", []):
        lines += [f"> {n}", ""]
    small = res["small"]
    rows = []
    cols = [s for s in SMALL if s in small]
    for c in map(str, res["config"]["clients"]):
        row = {s: (small.get(s) or {}).get(c, {}).get("ops_s") for s in cols}
        rows.append((f"{c} clients, ops/s", row, _pair_ratios(row, SMALL_PAIRS)))
        for q, what in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("cpu_us", "CPU µs per write")):
            row = {s: (small.get(s) or {}).get(c, {}).get(q) for s in cols}
            if any(row.values()):
                rows.append((f"{c} clients, {what}", row, _pair_ratios(row, SMALL_PAIRS, True)))
    if small:
        lines += _table(
            "1. Small updates: 1 KB gradient pushes, committed (closed loop)", cols, rows, "{:.1f}", "ratios (pair)"
        )
        lines += [
            "CPU µs per write: user + system CPU of all replicas/members (/proc) inside the window ÷ committed writes.",
            "Durable pair: paramstore fdatasyncs its journal before acknowledging (raft.fsync, the default) and etcd",
            "(data dir on the same disk) fsyncs its WAL. Neither syncs to a disk: paramstore-nofsync and etcd-tmpfs",
            "(data on /dev/shm, its fsync is free). Redis does not persist (WAIT 2: in the replicas' memory).",
            "",
        ]
    rows = []
    for mb in map(str, res["config"]["sizes"]):
        row = {s: (res["pull"].get(s) or {}).get(mb) for s in PULL}
        rows.append((f"{mb} MB, MB/s", row, _ratios(row["paramstore"], row, PULL[1:])))
    if res["pull"]:
        lines += _table("2. Pulls: GET of a tensor from a follower/replica", PULL, rows)
    lines += _limits(res)
    rows = []
    cols = [s for s in PUSH if s in res["push"]]
    for mb in map(str, res["config"]["sizes"]):
        row = {s: (res["push"].get(s) or {}).get(mb) for s in cols}
        rows.append((f"{mb} MB, MB/s", row, _pair_ratios(row, PUSH_PAIRS)))
    if res["push"]:
        lines += _table("3. Large pushes committed on 3 replicas", cols, rows, "{:.1f}", "ratios (pair)")
        lines += [
            "paramstore and etcd (limit raised) sync to the disk; paramstore-nofsync and etcd-tmpfs do not; Redis",
            "does not persist: paramstore-nofsync ÷ redis WAIT 2 is the pair where neither syncs. etcd-tmpfs (limit",
            "raised) and etcd (default limit: one attempt per size on a fresh cluster; it refuses over 1.5 MiB) run",
            "with --only all.",
            "",
        ]
    mem = res["memory"]
    if mem:
        lines += [
            "**4. Memory: peak RSS per replica while pushing 64 MB gradients**",
            "",
            "| system | held (params + Adam state) | peak RSS per replica | peak ÷ held | pushes |",
            "|---|---|---|---|---|",
        ]
        for s, d in mem.items():
            peaks = ", ".join(f"{v:.0f}" for v in d["peak_rss_mb"].values())
            lines.append(f"| {s} | {d['held_mb']} MB | {peaks} MB | {_cell(d['ratio'], '{:.2f}')} | {d['pushes']} |")
        lines.append("")
    lines += _tables(res.get("tables"))
    rows = []
    row = {s: res["failover"].get(s) for s in ("paramstore", "etcd", "pysyncobj")}
    if any(row.values()):
        lines += _table(
            "5. Failover: SIGKILL of the leader → first committed write (s; etcd on disk)",
            ["paramstore", "etcd", "pysyncobj"],
            [("seconds", row, _ratios(row["paramstore"], row, ["etcd", "pysyncobj"], True))],
            "{:.2f}",
        )
    row = {s: res["recovery"].get(s) for s in ("paramstore", "redis")}
    if any(row.values()):
        held = next(v["held_mb"] for v in row.values() if v)
        lines += _table(
            f"6. Recovery: restarted replica holding {held} MB ready (s)",
            ["paramstore", "redis"],
            [("seconds", row, _ratios(row["paramstore"], row, ["redis"], True))],
            "{:.1f}",
        )
    lines += ["**Leader elections (term changes) during each workload, failover excluded**", ""]
    for s, d in res["elections"].items():
        lines.append(f"- {s}: " + ", ".join(f"{w} {n}" for w, n in d.items() if n is not None))
    lines += ["", "**Targets**", "", "| target | met | figure |", "|---|---|---|"]
    for name, ok, fig in targets(res):
        lines.append(f"| {name} | {'yes' if ok else ('–' if ok is None else '**no**')} | {fig} |")
    if res.get("ctr"):
        from .ctr import markdown as ctr_markdown

        lines += ctr_markdown(res["ctr"])
    if res.get("gloo"):
        from .gloo import markdown as gloo_markdown

        lines += [
            "",
            "**Issue 14: the article's gloo example, scaled (bench/gloo.py)**",
            "",
            gloo_markdown(res["gloo"]),
        ]
    if res.get("failures"):
        lines += ["", "**Failures:** " + "; ".join(res["failures"])]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = {}

    def bars(ax, groups: list[str], series: dict[str, list], title: str, ylabel: str, log=False):
        names = [s for s, v in series.items() if any(x is not None for x in v)]
        w = 0.8 / max(1, len(names))
        for i, s in enumerate(names):
            xs = [g + (i - (len(names) - 1) / 2) * w for g in range(len(groups))]
            ys = [v if v is not None else 0 for v in series[s]]
            c = colors.setdefault(s, f"C{len(colors) % 10}")
            ax.bar(xs, ys, w, label=s, color=c)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if names:
            ax.legend(fontsize=7)

    def med(d):
        return (d or {}).get("median")

    cl = list(map(str, res["config"]["clients"]))
    sz = list(map(str, res["config"]["sizes"]))
    bars(
        axes[0][0],
        [f"{c} clients" for c in cl],
        {s: [med((res["small"].get(s) or {}).get(c, {}).get("ops_s")) for c in cl] for s in SMALL},
        "1. small 1 KB pushes",
        "committed ops/s",
        log=True,
    )
    bars(
        axes[0][1],
        [f"{m} MB" for m in sz],
        {s: [med((res["pull"].get(s) or {}).get(m)) for m in sz] for s in PULL},
        "2. pull from follower",
        "MB/s",
        log=True,
    )
    bars(
        axes[0][2],
        [f"{m} MB" for m in sz],
        {s: [med((res["push"].get(s) or {}).get(m)) for m in sz] for s in PUSH},
        "3. large pushes on 3 replicas",
        "MB/s",
        log=True,
    )
    mem = res["memory"]
    bars(
        axes[1][0],
        ["peak RSS ÷ held"],
        {s: [med(d["ratio"])] for s, d in mem.items()},
        "4. memory (lower is better)",
        "×",
    )
    bars(
        axes[1][1],
        ["failover"],
        {s: [med(res["failover"].get(s))] for s in ("paramstore", "etcd", "pysyncobj")},
        "5. failover (lower is better)",
        "s",
    )
    bars(
        axes[1][2],
        ["recovery"],
        {s: [med(res["recovery"].get(s))] for s in ("paramstore", "redis")},
        "6. recovery (lower is better)",
        "s",
    )
    fig.suptitle(f"paramstore vs peers — {res['machine']['cores']} cores, {res['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _tables(t: dict | None) -> list[str]:
    """Embedding tables (bench/tables.py): rows/s medians and ratios, in RAM then over the cap."""
    if not t or "lookup" not in t:
        return []
    fit, small = t.get("fit_cap_mb", t["cap_mb"]), t.get("over_cap")

    def rows(phase: dict, where: str) -> list[str]:
        lk, pu = phase["lookup"]["rows_s"], phase["push"]["rows_s"]
        ps_l, ps_p = lk["paramstore"]["median"], pu["paramstore"]["median"]
        return [
            f"| lookup on a replica, {where} | {ps_l:,.0f} | {lk['redis']['median']:,.0f} (MGET) | "
            f"{lk['numpy']['median']:,.0f} | {ps_l / lk['redis']['median']:.2f}x |",
            f"| push, rowwise_adagrad, on 3 replicas, {where} | {ps_p:,.0f} "
            f"({pu['paramstore (majority ack)']['median']:,.0f} acked) | {pu['redis']['median']:,.0f} "
            f"(SET + WAIT 2) | | {ps_p / pu['redis']['median']:.2f}x |",
        ]

    out = [
        f"**Embedding tables: {t['rows']:,} rows x dim {t['dim']} float32, "
        f"{(t.get('bytes_on_disk') or 0) / (1 << 20):.0f} MB on disk per replica; filled in {t['fill_s']:.0f} s**",
        "",
        "| rows/s, 4,096 per request | paramstore | redis | numpy gather | paramstore ÷ redis |",
        "|---|---|---|---|---|",
        *rows(t, f"cap {fit} MB (holds the table)"),
        *(rows(small, f"cap {small['cap_mb']} MB (table larger)") if small else []),
        "",
        f"Peak RSS per replica with the {fit} MB cap: {', '.join(f'{v:.0f}' for v in t['peak_rss_mb'].values())} MB.",
    ]
    if small:
        out.append(
            f"Over the {small['cap_mb']} MB cap, since the restart: "
            f"{', '.join(f'{v:.0f}' for v in small['peak_rss_mb'].values())} MB "
            f"(goal ≤ cap + 300 = {small['cap_mb'] + 300} MB)."
        )
    j = t.get("join")
    if j:
        out.append(
            f"A joining replica received {j['table_gb']:.2f} GB of tables in {j['tables_transfer_s'] or 0:.1f} s "
            f"({j['s_per_gb'] or 0:.1f} s/GB), ready {j['ready_s']:.1f} s after start; the sources' RSS rose "
            f"{j['source_extra_rss_mb']:.0f} MB at most; {j['elections']} election(s)."
        )
    return [*out, ""]


def update_docs(path: Path, md: str) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(
        f"{head}{BEGIN}\n\n![throughput per workload](../bench/results/throughput.png)\n\n{md}\n{END}{tail}"
    )
