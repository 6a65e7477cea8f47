"""GET /ui: the dashboard page, rendered by real headless Chromium against a
real 3-replica cluster (Debian's chromium + chromium-driver; see the Makefile)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

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
    assert "/v1/cluster" in html and "/v1/tensors" in html
    # no external assets: nothing loaded from another origin
    for marker in ("http://", "https://", "//cdn", "<link"):
        assert marker not in html, marker
    assert "src=" not in html.replace("script-src", "")


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
    for f in FLAGS:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.cluster
def test_dashboard_fills_from_a_live_cluster(tmp_path, browser):
    cluster = Cluster(tmp_path, replicas=3, shards=4)
    stop = threading.Event()
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

        def traffic() -> None:  # steady pushes, so the page has a rate to derive
            g = np.ones((64, 32), np.float32)
            while not stop.is_set():
                cluster.grad("n2", hot, g)

        pusher = threading.Thread(target=traffic, daemon=True)
        pusher.start()

        browser.get(cluster.urls["n1"] + "/ui?interval=500")

        def shard_rows():
            rows = browser.execute_script(
                "return Array.from(document.querySelectorAll('#shards tbody tr'))"
                ".map(tr => Array.from(tr.cells).map(td => td.textContent));"
            )
            return rows if len(rows) == 4 and all(r[2] in cluster.ids for r in rows) else None

        rows = wait_until(shard_rows, 20, "the shard table to fill with leaders")
        status = cluster.status("n1")
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
        # a few more polls, so the pushes/s sparkline in the screenshot has a shape
        polls = int(browser.execute_script("return document.body.dataset.polls"))
        wait_until(
            lambda: int(browser.execute_script("return document.body.dataset.polls")) >= polls + 8,
            15,
            "eight more polls",
        )
        # docs/ui.png is refreshed only on request, so a test run leaves the tree clean
        shot = ROOT / "docs" / "ui.png" if os.environ.get("PARAMSTORE_UPDATE_DOCS") else tmp_path / "ui.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        stop.set()
        cluster.close()
