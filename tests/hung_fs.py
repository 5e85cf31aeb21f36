"""A read-only passthrough file system (FUSE, through mfusepy) on which one file never answers a read,
as a file on a hung parallel file system: stat and open still answer, the read waits until unmount.

    python tests/hung_fs.py SOURCE MOUNTPOINT HANG_AFTER NAMED

The (HANG_AFTER + 1)-th distinct file read is the one that hangs, whichever it is (a run reads in an
order of its own); its path under MOUNTPOINT is written to the file NAMED as the read starts.
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import mfusepy as fuse


class HungReads(fuse.Operations):
    def __init__(self, source: str, mountpoint: str, hang_after: int, named: str) -> None:
        self.source, self.mountpoint, self.hang_after, self.named = source, mountpoint, hang_after, named
        self.read_files: set[str] = set()
        self.hung: str | None = None
        self.lock = threading.Lock()

    def _real(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._real(path))
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno) from None
        return {
            key: getattr(st, key)
            for key in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime", "st_mtime", "st_ctime")
        }

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._real(path))]

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise fuse.FuseOSError(errno.EROFS)
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        with self.lock:
            if path not in self.read_files:
                self.read_files.add(path)
                if self.hung is None and len(self.read_files) > self.hang_after:
                    self.hung = path
                    with open(self.named, "w") as file:
                        file.write(os.path.join(self.mountpoint, path.lstrip("/")))
        if path == self.hung:
            threading.Event().wait()  # never answers
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)
        return 0


def main() -> None:
    source, mountpoint, hang_after, named = sys.argv[1:5]
    fuse.FUSE(
        HungReads(source, mountpoint, int(hang_after), named), mountpoint, foreground=True, ro=True, nothreads=False
    )


if __name__ == "__main__":
    main()
