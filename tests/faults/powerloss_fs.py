"""A FUSE file system that forgets, on a "power cut", whatever was not fsynced.

Run as `python -m tests.faults.powerloss_fs BACKING MOUNTPOINT CONTROL_SOCKET`.
Reads and writes pass through to files under BACKING/live (the page cache, as
the replica sees it). The durable state is kept beside it, as a disk would:

- per file (inode): its content as of its last fsync/fdatasync, in
  BACKING/durable/<inode>; fsync copies the ranges written since (and the size);
- per directory: its file entries (name -> inode) as of its last directory
  fsync; files created, renamed or unlinked since are not yet on "disk".
  Directories themselves (mkdir) are durable at once: a simplification, the
  store fsyncs no parent of a directory it creates.

The control socket takes one line: `cut` (power cut: drop every unsynced
write and directory entry, rebuild BACKING/live from the durable state; the
processes using the mount must be dead) or `stats`, and answers one JSON line.

Shared-writable mmap works here (direct_io is off), but an mmap'd write
reaches the file system only at writeback or msync, so this layer sees it
late, as a disk would: good enough, but paramstore's journal no longer uses
mmap (store/durable_journal.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from fuse import FUSE, FuseOSError, Operations


class PowerLossFS(Operations):  # type: ignore[misc]
    def __init__(self, backing: Path) -> None:
        self.live = backing / "live"
        self.store = backing / "durable"
        self.live.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.next_ino = 1
        self.ino: dict[str, int] = {}  # live path -> inode
        self.durable_dirs: dict[str, dict[str, int]] = {"/": {}}  # dir -> {name: inode}, as of its last fsync
        self.dirty: dict[int, list[tuple[int, int]]] = {}  # inode -> written ranges since its last fsync
        self.fds: dict[int, int] = {}  # open fd -> inode
        self.stats = {"fsyncs": 0, "dir_fsyncs": 0, "cuts": 0, "dropped_writes": 0, "dropped_entries": 0}

    # ---- helpers -------------------------------------------------------------
    def _full(self, path: str) -> str:
        return str(self.live) + path

    def _new_ino(self, path: str) -> int:
        ino = self.next_ino
        self.next_ino += 1
        self.ino[path] = ino
        self.dirty[ino] = [(0, 0)]  # its (empty) content is not durable yet either
        return ino

    def _ino_of(self, path: str) -> int:
        ino = self.ino.get(path)
        return ino if ino is not None else self._new_ino(path)

    def _mark(self, ino: int, off: int, length: int) -> None:
        self.dirty.setdefault(ino, []).append((off, length))

    # ---- metadata ------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        try:
            st = os.lstat(self._full(path))
        except OSError as e:
            raise FuseOSError(e.errno) from None
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._full(path))
        keys = (
            "f_bavail",
            "f_bfree",
            "f_blocks",
            "f_bsize",
            "f_favail",
            "f_ffree",
            "f_files",
            "f_flag",
            "f_frsize",
            "f_namemax",
        )
        return {k: getattr(st, k) for k in keys}

    def mkdir(self, path: str, mode: int) -> None:
        with self.lock:
            os.mkdir(self._full(path), mode)
            self.durable_dirs.setdefault(path, {})

    def rmdir(self, path: str) -> None:
        with self.lock:
            os.rmdir(self._full(path))
            self.durable_dirs.pop(path, None)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid)

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._full(path), times)

    def unlink(self, path: str) -> None:
        with self.lock:
            os.unlink(self._full(path))
            self.ino.pop(path, None)

    def rename(self, old: str, new: str) -> None:
        with self.lock:
            os.rename(self._full(old), self._full(new))
            prefix = old + "/"
            for p in [p for p in self.ino if p == old or p.startswith(prefix)]:
                self.ino[new + p[len(old) :]] = self.ino.pop(p)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self.lock:
            os.truncate(self._full(path), length)
            self._mark(self._ino_of(path), length, 0)

    # ---- data ----------------------------------------------------------------
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.lock:
            fd = os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
            self.ino.pop(path, None)
            self.fds[fd] = self._new_ino(path)
            return fd

    def open(self, path: str, flags: int) -> int:
        with self.lock:
            fd = os.open(self._full(path), flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL))
            ino = self._ino_of(path)
            if flags & os.O_TRUNC:
                self._mark(ino, 0, 0)
            self.fds[fd] = ino
            return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        n = os.pwrite(fh, data, offset)
        with self.lock:
            self._mark(self.fds[fh], offset, n)
        return n

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> None:
        raise FuseOSError(errno.EOPNOTSUPP)

    def flush(self, path: str, fh: int) -> None:
        return None

    def release(self, path: str, fh: int) -> None:
        with self.lock:
            self.fds.pop(fh, None)
            os.close(fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        """The file's content as it is now becomes what survives a cut."""
        with self.lock:
            ino = self.fds[fh]
            ranges = self.dirty.pop(ino, [])
            self.stats["fsyncs"] += 1
            if not ranges:
                return
            size = os.fstat(fh).st_size
            target = self.store / str(ino)
            out = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.ftruncate(out, size)
                for off, length in _merge(ranges):
                    end = min(off + length, size)
                    while off < end:
                        chunk = os.pread(fh, min(end - off, 1 << 20), off)
                        if not chunk:
                            break
                        os.pwrite(out, chunk, off)
                        off += len(chunk)
            finally:
                os.close(out)

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> None:
        return None

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        """The directory's file entries as they are now become what survives a cut."""
        with self.lock:
            self.stats["dir_fsyncs"] += 1
            prefix = "/" if path == "/" else path + "/"
            self.durable_dirs[path] = {
                p[len(prefix) :]: ino
                for p, ino in self.ino.items()
                if p.startswith(prefix) and "/" not in p[len(prefix) :]
            }

    # ---- power cut -------------------------------------------------------------
    def cut(self) -> dict[str, Any]:
        with self.lock:
            self.stats["cuts"] += 1
            self.stats["dropped_writes"] += sum(len(r) for r in self.dirty.values())
            for fd in list(self.fds):
                os.close(fd)
            self.fds.clear()
            survivors: dict[str, int] = {}
            for d, entries in self.durable_dirs.items():
                prefix = "/" if d == "/" else d + "/"
                for name, ino in entries.items():
                    survivors[prefix + name] = ino
            self.stats["dropped_entries"] += len(set(self.ino.items()) - set(survivors.items()))
            for root, _dirs, files in os.walk(self.live):
                for f in files:
                    os.unlink(os.path.join(root, f))
            for path, ino in survivors.items():
                if not os.path.isdir(os.path.dirname(self._full(path))):
                    continue
                src = self.store / str(ino)
                if src.exists():
                    shutil.copyfile(src, self._full(path))
                else:  # entry synced, content never: an empty file
                    open(self._full(path), "wb").close()
            self.ino = dict(survivors)
            self.dirty.clear()
            return dict(self.stats)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length - out[-1][0])
        else:
            out.append([off, length])
    return [(o, n) for o, n in out]


def _serve_control(fs: PowerLossFS, path: str) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            cmd = f.readline().strip()
            try:
                result: Any = fs.cut() if cmd == b"cut" else dict(fs.stats)
            except Exception as e:  # reported to the test, which fails with it
                result = {"error": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(result).encode() + b"\n")
            f.flush()


def main() -> None:
    backing, mountpoint, control = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    fs = PowerLossFS(backing)
    threading.Thread(target=_serve_control, args=(fs, control), daemon=True).start()
    FUSE(fs, mountpoint, foreground=True, nothreads=False, allow_other=False, direct_io=False)


if __name__ == "__main__":
    main()
