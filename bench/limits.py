"""What this machine can do at most, measured in the same run as the workloads:
loopback TCP by iperf3 (one stream and four), the disk's sequential write and
fdatasync rate by fio (in the directory the replicas write to), and memcpy
bandwidth by numpy. Each workload's figure is then a fraction of its limit.

iperf3 and fio come from Debian's packages (the Makefile's bench stamp
installs them); a missing tool is reported as such, not guessed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

MB = 1 << 20
IPERF_PORT = 15200  # inside the harness's 11000-19999, unused by the systems


def _missing(tool: str) -> dict:
    return {"median": None, "error": f"{tool} not installed (apt-get install {tool})"}


def _one(value: float) -> dict:
    return {"median": value, "min": value, "max": value, "runs": [value]}


def iperf3_mb_s(streams: int, seconds: float = 3.0) -> dict:
    """Loopback TCP, `streams` parallel streams, received MB/s."""
    if shutil.which("iperf3") is None:
        return _missing("iperf3")
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # the server listens within a few ms; no port probe (it serves one client)
            r = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_PORT), "-t", str(seconds), "-P", str(streams), "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            out = json.loads(r.stdout or "{}")
            if "end" in out and "sum_received" in out["end"]:
                return _one(out["end"]["sum_received"]["bits_per_second"] / 8 / MB)
            time.sleep(0.1)
        return {"median": None, "error": f"iperf3 failed: {out.get('error', r.stderr[:200])}"}
    finally:
        server.kill()
        server.wait()


def _fio(directory: Path, *args: str) -> dict:
    r = subprocess.run(
        ["fio", f"--directory={directory}", "--output-format=json", "--ioengine=psync", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    for f in directory.glob("limit-*"):
        f.unlink()
    return json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]["write"]


def disk_write_mb_s(directory: Path, mb: int = 512) -> dict:
    """Sequential 1 MB writes of `mb` MB, fsynced at the end (as a payload file is)."""
    if shutil.which("fio") is None:
        return _missing("fio")
    job = _fio(directory, "--name=limit-seq", "--rw=write", "--bs=1M", f"--size={mb}M", "--end_fsync=1")
    return _one(job["bw_bytes"] / MB)


def fdatasync_per_s(directory: Path, seconds: float = 3.0) -> dict:
    """4 KB appends each followed by fdatasync (a journal batch): syncs per second."""
    if shutil.which("fio") is None:
        return _missing("fio")
    job = _fio(
        directory,
        "--name=limit-sync",
        "--rw=write",
        "--bs=4k",
        "--size=64M",
        "--fdatasync=1",
        "--time_based",
        f"--runtime={seconds}",
    )
    return _one(job["iops"])


def memcpy_mb_s(mb: int = 256, reps: int = 5) -> dict:
    """One core copying `mb` MB between two resident buffers, best of `reps`."""
    src = np.ones(mb * MB, np.uint8)
    dst = np.zeros_like(src)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, mb / (time.perf_counter() - t))
    return _one(best)


def measure(directory: Path, log) -> dict[str, dict]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {
        "loopback TCP, iperf3 1 stream (MB/s)": iperf3_mb_s(1),
        "loopback TCP, iperf3 4 streams (MB/s)": iperf3_mb_s(4),
        "disk sequential write, fio 1 MB blocks (MB/s)": disk_write_mb_s(directory),
        "disk fdatasync rate, fio 4 KB appends (syncs/s)": fdatasync_per_s(directory),
        "memcpy, numpy, one core (MB/s)": memcpy_mb_s(),
    }
    for name, v in out.items():
        log(f"  limit: {name}: {v['median'] if v['median'] is not None else v.get('error')}")
    return out
