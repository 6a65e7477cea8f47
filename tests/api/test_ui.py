"""GET /ui: the dashboard page, rendered by real headless Chromium against a
real 3-replica cluster (Debian's chromium + chromium-driver; see the Makefile)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from paramstore import Client
from tests.cluster.harness import Cluster
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1500,900",
]


def test_ui_is_served_self_contained(client):
    r = client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/v1/cluster" in html and "/v1/tensors" in html and "/v1/stats" in html
    # no external assets: nothing loaded from another origin
    for marker in ("http://", "https://", "//cdn", "<link"):
        assert marker not in html, marker
    assert "src=" not in html.replace("script-src", "")
    assert client.get("/favicon.ico").status_code == 204  # browsers ask; a 404 would be a console error


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "headless Chromium is required: apt-get install -y chromium chromium-driver "
            "(the Makefile's test target installs it)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, read by the test
    for f in FLAGS:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def chart_points(browser, minimum: int) -> dict[str, int] | None:
    """Points each chart drew, once every chart has at least `minimum` of them."""
    counts = browser.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('.chart svg'))"
        ".map(svg => [svg.id, Number(svg.dataset.points || 0)]));"
    )
    return counts if counts and all(n >= minimum for n in counts.values()) else None


@pytest.mark.cluster
def test_dashboard_fills_from_a_live_cluster(tmp_path, browser):
    cluster = Cluster(tmp_path, replicas=3, shards=4)
    stop = threading.Event()
    closing: list = []
    try:
        cluster.start()
        cluster.wait_ready()
        names = [f"layer{i}.weight" for i in range(6)]
        for i, name in enumerate(names):
            r = cluster.put(
                "n1",
                name,
                np.zeros((64, 32 * (i + 1)), np.float32),
                headers={"X-Optimizer": '{"type": "sgd", "lr": 0.01}'},
            )
            assert r.status_code == 201, r.text
        hot = names[0]

        # the page is served by a replica that does not lead shard 0 (that leader is frozen later);
        # the SDK sends its table requests there, and the page shows the table traffic it served
        home = next(n for n in cluster.ids if n != cluster.leader_of(0))
        sdk = Client([cluster.urls[home]])
        closing.append(sdk.close)
        sdk.create_table("emb", dim=16)

        def traffic() -> None:  # steady pushes and pulls, so the page has rates to derive
            g = np.ones((64, 32), np.float32)
            big = np.ones((64, 1024), np.float32)  # 256 KB: sideloaded over the data path
            ids = np.arange(64, dtype=np.int64)
            i = 0
            while not stop.is_set():
                cluster.grad("n2", hot, g)
                cluster.get("n1", hot)
                if i % 4 == 0:
                    cluster.grad("n3", names[5], big[:, : 32 * 6])
                    sdk.push_rows("emb", ids, np.ones((64, 16), np.float32))
                    sdk.lookup("emb", ids)
                i += 1

        pusher = threading.Thread(target=traffic, daemon=True)
        pusher.start()

        browser.get(cluster.urls[home] + "/ui?interval=500")

        def shard_rows():
            rows = browser.execute_script(
                "return Array.from(document.querySelectorAll('#shards tbody tr'))"
                ".map(tr => Array.from(tr.cells).map(td => td.textContent));"
            )
            return rows if len(rows) == 4 and all(r[2] in cluster.ids for r in rows) else None

        rows = wait_until(shard_rows, 20, "the shard table to fill with leaders")
        status = cluster.status(home)
        for row, shard in zip(rows, status["shards"], strict=True):
            assert int(row[0]) == shard["shard"] and row[2] == shard["leader"]
            assert int(row[4]) == shard["term"]  # term
            assert int(row[5]) >= int(row[6])  # commit >= applied

        def hot_rate():
            cells = browser.execute_script(
                "const tr = Array.from(document.querySelectorAll('#tensors tbody tr'))"
                ".find(tr => tr.cells[0].textContent === arguments[0]);"
                "return tr ? Array.from(tr.cells).map(td => td.textContent) : null;",
                hot,
            )
            return cells if cells and float(cells[7]) > 0 else None

        cells = wait_until(hot_rate, 20, "pushes/s for the pushed tensor")
        assert cells[1] == "float32" and cells[5] == "8.0 KiB" and int(cells[6]) > 1
        # read in one script: the page re-renders its tables on every poll
        page = browser.execute_script(
            "return {tensors: document.querySelectorAll('#tensors tbody tr').length,"
            " replicas: Array.from(document.querySelectorAll('#replicas tbody tr')).map(tr => tr.cells[0].textContent),"
            " pps: document.getElementById('pps').textContent,"
            " error: getComputedStyle(document.getElementById('error')).display};"
        )
        assert page["tensors"] == len(names)
        assert [r.split()[0] for r in page["replicas"]] == cluster.ids
        assert float(page["pps"]) > 0
        assert page["error"] == "none"
        charts = wait_until(
            lambda: chart_points(browser, minimum=4), 30, "every chart to draw points from a few polls of /v1/stats"
        )
        assert set(charts) == {"c-ops", "c-replicas", "c-links", "c-commit", "c-lag"}

        # rates the page derived: pushes and pulls, MB/s on every link, commit latencies
        def rates_shown():
            legend = browser.execute_script(
                "return Object.fromEntries(['l-ops', 'l-replicas', 'l-links', 'l-commit']"
                ".map(id => [id, Array.from(document.getElementById(id).children).map(s => s.textContent)]));"
            )
            last = {k: {t.rsplit(" ", 1)[0]: float(t.rsplit(" ", 1)[1]) for t in v} for k, v in legend.items()}
            ok = (
                last["l-ops"]["pushes/s"] > 0
                and last["l-ops"]["pulls/s"] > 0
                and set(last["l-links"]) == {f"{a}→{b}" for a in cluster.ids for b in cluster.ids if a != b}
                and max(last["l-links"].values()) > 0
                and max(last["l-replicas"].values()) > 0
                and last["l-commit"]["n2 p50"] > 0  # n2 proposes the pushes it receives
            )
            return last if ok else None

        wait_until(rates_shown, 20, "pushes/s, pulls/s, link MB/s and commit latency above 0 on the charts")
        table = wait_until(
            lambda: browser.execute_script(
                "const tr = document.querySelector('#tables tbody tr');"
                "return tr && Number(tr.cells[6].textContent) > 0 ?"
                " Array.from(tr.cells).map(td => td.textContent) : null;"
            ),
            20,
            "the table row with pushes/s",
        )
        assert table[0] == "emb" and int(table[1]) == 64, table
        # a leader change (a leader other than `home` frozen until another replica takes over), marked on the time axis
        frozen = next(s["leader"] for s in cluster.status(home)["shards"] if s["leader"] not in (None, home))
        cluster.pause(frozen)
        try:
            wait_until(
                lambda: browser.execute_script("return document.querySelectorAll('#c-ops line.leader').length") > 0,
                20,
                "a leader change marked on the charts",
            )
        finally:
            cluster.resume(frozen)
        # docs/ui.png is refreshed only on request (a minute more of load), so a test run leaves the tree clean
        if os.environ.get("PARAMSTORE_UPDATE_DOCS"):
            browser.set_window_size(1500, 1750)
            polls = int(browser.execute_script("return document.body.dataset.statPolls"))
            wait_until(
                lambda: int(browser.execute_script("return document.body.dataset.statPolls")) >= polls + 100,
                120,
                "a minute of polls for the screenshot",
            )
            shot = ROOT / "docs" / "ui.png"
        else:
            shot = tmp_path / "ui.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        # once the traffic stops, each link's two ends agree: what one replica counted as sent to
        # a peer, the peer counted as received from it (data path exactly, Raft but for heartbeats)
        stop.set()
        pusher.join(timeout=30)

        def ends_agree():
            reps = {r["node"]: r for r in httpx.get(cluster.urls[home] + "/v1/stats?cluster=1").json()["replicas"]}
            links = {(n, x["channel"], x["peer"]): x for n, r in reps.items() for x in r.get("links", [])}
            for a in cluster.ids:
                for b in cluster.ids:
                    if a == b:
                        continue
                    data_out, data_in = links[a, "data", b]["bytes_out"], links[b, "data", a]["bytes_in"]
                    raft_out, raft_in = links[a, "raft", b]["bytes_out"], links[b, "raft", a]["bytes_in"]
                    if data_out != data_in or raft_out < 1000 or abs(raft_out - raft_in) > 64 << 10:
                        return None
            return links

        links = wait_until(ends_agree, 20, "both ends of every link to count the same bytes")
        assert links["n3", "data", "n1"]["bytes_out"] >= 64 * 192 * 4  # n3 forwarded sideloaded pushes
        # nothing but this replica was asked for anything, and nothing went wrong on the console
        origins = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
        )
        assert set(origins) <= {cluster.urls[home]}, origins
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors
    finally:
        stop.set()
        if "pusher" in locals():
            pusher.join(timeout=15)
        for close in closing:
            close()
        cluster.close()
