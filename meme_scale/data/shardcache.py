"""A bounded local cache of fetched remote shards (``data.cache_dir``, ``data.cache_max_gb``).

A shard is cached as a side effect of reading it: its bytes are written to a private temporary
file while the reader consumes them, and the file is renamed into place only once the whole
object has arrived (its size checked where the server told it). So a cache entry is always a
complete shard, concurrent readers (DataLoader workers, ranks on one machine) never see each
other's partial files, and the first complete read wins (the others replace it with the same
bytes). Entries are keyed by the URL and the dataset's publication (meta.json's digest), so a
republished dataset never reads a stale shard. After each new entry the least recently used
entries are deleted until the cache fits its bound; a shard larger than the bound is not kept.
"""
from __future__ import annotations

import hashlib
import io
import os
import time

STALE_TMP_S = 3600.0  # a temporary file this old belongs to a reader that died


class ShardCache:
    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        os.makedirs(folder, exist_ok=True)

    def path(self, url: str, version: str) -> str:
        digest = hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:24]
        return os.path.join(self.folder, f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1][-80:]}")

    def lookup(self, url: str, version: str) -> str | None:
        """The cached file of this shard (marked as just used), or None."""
        path = self.path(url, version)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def tee(self, raw: io.RawIOBase, url: str, version: str) -> io.RawIOBase:
        return _Tee(raw, self, self.path(url, version))

    def commit(self, tmp: str, final: str) -> None:
        if os.path.getsize(tmp) > self.max_bytes:
            os.remove(tmp)
            return
        os.replace(tmp, final)
        self.evict()

    def evict(self) -> None:
        """Delete least recently used entries (and dead readers' temporary files) down to the bound."""
        entries, now = [], time.time()
        with os.scandir(self.folder) as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if ".tmp-" in e.name:
                    if now - st.st_mtime > STALE_TMP_S:
                        _remove(e.path)
                    continue
                entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _remove(path)  # a reader that has it open keeps reading it (POSIX)
            total -= size


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _Tee(io.RawIOBase):
    """Passes a remote stream through, keeping a copy that becomes a cache entry at a clean end."""

    def __init__(self, raw: io.RawIOBase, cache: ShardCache, final: str):
        super().__init__()
        self.raw, self.cache, self.final = raw, cache, final
        self.tmp = f"{final}.tmp-{os.getpid()}-{id(self):x}"
        self.copy = open(self.tmp, "wb")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        if self.copy is None:
            return n
        if n:
            self.copy.write(memoryview(buf)[:n])
        else:  # the source ended cleanly (it raises on a short or failed read)
            self.copy.close()
            self.copy = None
            self.cache.commit(self.tmp, self.final)
        return n

    def close(self) -> None:
        if self.copy is not None:  # abandoned before the end: no entry
            self.copy.close()
            self.copy = None
            _remove(self.tmp)
        self.raw.close()
        super().close()
