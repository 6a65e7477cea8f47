"""`ServingTable`: a table's rows for serving, rebuilt from the directory
`paramstore export --follow DIR` fills (a full base file, then delta files,
each `<version>.safetensors` followed by its `<version>.done` marker).

Only numpy: the files are read with the safetensors framing directly (the
library's numpy front end has no bfloat16; such rows are served as float32).
An ID the export never named is *absent*: serving has no optimizer or
initializer, so `lookup` fills it with `default` and `contains` says which
IDs were exported. Rows are held in memory, sorted by ID.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "U64": "<u8"}


def _header(f: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    meta = json.loads(header.pop("__metadata__", {}).get("paramstore", "{}"))
    return meta, header


def export_metadata(path: Path) -> dict[str, Any]:
    """The `paramstore` metadata of an export file (its header only)."""
    with open(path, "rb") as f:
        return _header(f)[0]


def read_export_file(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the `paramstore` metadata, arrays) of one export file; bfloat16 rows
    come back as float32."""
    with open(path, "rb") as f:
        meta, header = _header(f)
        data = f.read()
    arrays = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=_DTYPES[spec["dtype"]]).reshape(spec["shape"])
        if spec["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        arrays[name] = arr
    return meta, arrays


class ServingTable:
    """Rows by ID from an export directory. `refresh()` applies the files
    finished since (or, after a new base, starts again from it); with
    `refresh_every` a daemon thread calls it that often. Lookups are safe
    while it refreshes (they see the rows before or after a file, never half)."""

    def __init__(self, directory: str | Path, refresh_every: float | None = None) -> None:
        self.directory = Path(directory)
        self.meta: dict[str, Any] = {}
        # (IDs sorted, their rows): replaced as one pair, so a lookup never mixes two files
        self._state: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        self._applied: list[str] = []  # file stems applied since the base, in order
        self._lock = threading.Lock()  # one refresh at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if refresh_every is not None:
            self._thread = threading.Thread(target=self._follow, args=(refresh_every,), daemon=True)

    @classmethod
    def load(cls, directory: str | Path, refresh_every: float | None = None) -> ServingTable:
        """The table as the finished files in `directory` have it (at least a base)."""
        table = cls(directory, refresh_every)
        if table.refresh() == 0:
            raise FileNotFoundError(f"{directory}: no finished export file (<version>.done) yet")
        if table._thread is not None:
            table._thread.start()
        return table

    # ---- reads ---------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The table version (summed over shard parts) of the last file applied."""
        return int(self.meta.get("table_version", 0))

    @property
    def cursor(self) -> str:
        """The last file's X-Version: where a delta request would go on from."""
        return str(self.meta.get("version", ""))

    def __len__(self) -> int:
        return len(self._state[0])

    def ids(self) -> np.ndarray:
        """Every exported ID, sorted."""
        return self._state[0]

    def contains(self, ids: Any) -> np.ndarray:
        return self._find(self._state[0], np.asarray(ids))[1]

    def lookup(self, ids: Any, default: float = 0.0) -> np.ndarray:
        """Rows for `ids` in order; IDs the export never named get `default`."""
        keys, rows = self._state
        pos, found = self._find(keys, np.asarray(ids))
        out = np.full((len(pos), rows.shape[1]), default, dtype=rows.dtype)
        out[found] = rows[pos[found]]
        return out

    @staticmethod
    def _find(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = ids.reshape(-1).astype(keys.dtype, copy=False)
        pos = np.searchsorted(keys, ids)
        found = pos < len(keys)
        found[found] = keys[pos[found]] == ids[found]
        return np.minimum(pos, max(len(keys) - 1, 0)), found

    # ---- refreshing -------------------------------------------------------------------
    def refresh(self) -> int:
        """Apply the files finished since the last call; how many were applied."""
        with self._lock:
            done = sorted(p.stem for p in self.directory.glob("*.done"))
            fresh = [stem for stem in done if not self._applied or stem > self._applied[-1]]
            bases = [s for s in fresh if export_metadata(self.directory / f"{s}.safetensors").get("kind") == "full"]
            if bases:  # the first load, or the exporter had to start again (410): from the newest base
                self._applied = []
                start = bases[-1]
            elif not self._applied:
                return 0
            else:
                start = self._applied[0]
            last = self._applied[-1] if self._applied else ""
            todo = [stem for stem in done if stem >= start and stem > last]
            for stem in todo:
                self._apply(stem)
            return len(todo)

    def _apply(self, stem: str) -> None:
        meta, arrays = read_export_file(self.directory / f"{stem}.safetensors")
        ids, rows = arrays["ids"], arrays["rows"]
        if meta.get("kind") == "full":
            order = np.argsort(ids, kind="stable")
            new_ids, new_rows = ids[order], rows[order]
        else:
            keys, old = self._state
            gone = np.isin(keys, np.concatenate([ids, arrays["removed"]]))
            merged_ids = np.concatenate([keys[~gone], ids])
            merged_rows = np.concatenate([old[~gone], rows]) if len(old) else rows
            order = np.argsort(merged_ids, kind="stable")
            new_ids, new_rows = merged_ids[order], merged_rows[order]
        self._state = (new_ids, new_rows)
        self.meta = meta
        self._applied.append(stem)

    def _follow(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except (OSError, ValueError, KeyError):  # a file being replaced: next round
                continue

    def close(self) -> None:
        self._stop.set()
