"""Where a shard set lives: one byte layer for shards, meta.json, sizes.json and tokenizer files.

``data.root`` (and a converter's ``--out``) is a local folder, ``file://PATH``, ``http(s)://...``,
``s3://bucket/prefix`` or any other fsspec protocol whose package is installed, or
``pipe:COMMAND`` (WebDataset's convention: the bytes are COMMAND's standard output; ``{}`` in the
command stands for the file name, otherwise ``/NAME`` is appended to its last word, so
``pipe:curl -sf http://host/ds`` reads ``http://host/ds/meta.json`` and so on). Commands run
without a shell, split like a POSIX command line.

Why retries live here, at the byte level: a failed read (connection reset, 5xx, timeout, a
command that died) is retried by reopening the object at the byte where it broke: a range
request for fsspec protocols, and for ``pipe:`` a restarted command whose first bytes are
skipped. The tar parser above therefore sees exactly the bytes it would have seen without the
failure: no sample is read twice or skipped, so exactly-once epochs, resume positions and the
0/1/2-worker equality hold for remote shards as for local ones. Consecutive failures back off
(doubling from ``retry_wait`` s, capped at 30 s, jittered so that ranks do not retry in step);
after ``retries`` attempts the error names the URL, the attempts and the last error.
Local paths take none of this: they are opened directly, as before.
"""
from __future__ import annotations

import functools
import io
import os
import random
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from .remote import BUFFER, RemoteReadError, Retrying, filesystem, open_source, protocol, transient

SPOOL_BYTES = 64 << 20  # a prefetched shard beyond this goes to a temporary file
MAX_WAIT = 30.0
T = TypeVar("T")

__all__ = ["RemoteReadError", "Storage", "basename", "is_remote", "join", "local_path", "protocol", "storage_for"]


def is_remote(url: str) -> bool:
    return protocol(url) != "file"


def local_path(url: str) -> str:
    """The filesystem path of a local root or file (``file://`` stripped)."""
    return url[len("file://"):] if url.lower().startswith("file://") else url


def join(root: str, name: str) -> str:
    """The URL of file ``name`` in the shard set at ``root``."""
    kind = protocol(root)
    if kind == "file":
        return os.path.join(local_path(root), name)
    if kind == "pipe":
        command = root[len("pipe:"):]
        if "{}" in command:
            return "pipe:" + command.replace("{}", name)
        words = shlex.split(command)
        if not words:
            raise ValueError(f"{root!r}: a pipe: root needs a command")
        words[-1] = words[-1].rstrip("/") + "/" + name
        return "pipe:" + shlex.join(words)
    return root.rstrip("/") + "/" + name


def basename(url: str) -> str:
    """Short name of a file URL for messages (a local file's name; a remote file's full URL)."""
    return os.path.basename(url) if protocol(url) == "file" else url


@dataclass
class Storage:
    """How to reach a shard set: retry policy, optional local cache, fsspec options per protocol.

    Picklable, so DataLoader workers get the same policy. ``options`` maps a protocol to fsspec
    keyword arguments (``{"s3": {"endpoint_url": ...}}``); without it fsspec and its backends read
    their usual environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` ...).
    """

    retries: int = 8  # attempts per file before giving up (consecutive failures; progress resets the count)
    retry_wait: float = 1.0  # first wait in seconds, doubling up to MAX_WAIT
    cache_dir: str = ""  # "": no cache; else fetched shards are kept here (see shardcache.py)
    cache_max_gb: float = 20.0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.retries < 1 or self.retry_wait < 0 or self.cache_max_gb <= 0:
            raise ValueError(f"Storage: need retries >= 1, retry_wait >= 0, cache_max_gb > 0; got {self}")

    # -- reading ----------------------------------------------------------------------------------
    def open(self, url: str, version: str | None = None) -> BinaryIO:
        """A buffered binary stream of the whole file; remote reads retry.

        Shards pass ``version``, the dataset's publication (meta.json's digest): they may come
        from and go into the cache, and a republished dataset never hits the previous one's
        entries. Without it (meta.json, sizes.json) the file is always fetched.
        """
        if not is_remote(url):
            return open(local_path(url), "rb")
        cache = self._cache() if version is not None else None
        if cache is not None:
            hit = cache.lookup(url, version)
            if hit is not None:
                return open(hit, "rb")
        raw: io.RawIOBase = Retrying(url, open_source(url, self.options), self)
        if cache is not None:
            raw = cache.tee(raw, url, version)
        return io.BufferedReader(raw, buffer_size=BUFFER)

    def read_bytes(self, url: str, version: str | None = None) -> bytes:
        with self.open(url, version) as f:
            return f.read()

    def prefetch(self, urls: list[str], version: str | None = None) -> Iterator[Callable[[], BinaryIO]]:
        """An opener per URL, in order; while one remote file is read, the next is fetched in a thread.

        Why: a request's latency (two round trips per object on S3) would otherwise stall the
        decoder once per shard; overlapped, remote reading keeps pace with local disk. The next
        file is spooled (in memory up to SPOOL_BYTES, then a temporary file), so huge shards
        cost disk, not memory. A fetch error surfaces when its opener is called, so the stream
        fails where it would have. Local files are opened as they come.
        """
        if not any(is_remote(u) for u in urls):
            yield from (functools.partial(self.open, u) for u in urls)
            return
        # Left early (end of an epoch's steps), a fetch still running just ends in its daemon thread.
        ahead = _Background(self._spool, urls[0], version) if urls else None
        for k, url in enumerate(urls):
            current = ahead
            ahead = _Background(self._spool, urls[k + 1], version) if k + 1 < len(urls) else None
            yield _Once(current, functools.partial(self.open, url, version))

    def _spool(self, url: str, version: str | None) -> BinaryIO:
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=self.cache_dir or None)
        with self.open(url, version) as f:
            shutil.copyfileobj(f, spool, BUFFER)
        spool.seek(0)
        return spool

    def exists(self, url: str) -> bool | None:
        """Whether the file exists; None where that cannot be asked cheaply (pipe: commands)."""
        kind = protocol(url)
        if kind == "file":
            return os.path.isfile(local_path(url))
        if kind == "pipe":
            return None
        fs, path = filesystem(url, self.options)

        def info() -> bool:  # not fs.isfile: fsspec's HTTP version reads any failure (a 503 too) as "no"
            try:
                return fs.info(path).get("type", "file") == "file"
            except FileNotFoundError:
                return False

        return self.retrying(url, info)

    def local_copy(self, url: str, version: str = "") -> str:
        """A local path holding the file (itself when local; else a copy in the cache or temp folder,
        keyed by URL and ``version``, the dataset's meta.json digest)."""
        if not is_remote(url):
            return local_path(url)
        import hashlib

        folder = self.cache_dir or os.path.join(tempfile.gettempdir(), f"meme_scale-{os.getuid()}")
        os.makedirs(folder, exist_ok=True)
        digest = hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:24]
        path = os.path.join(folder, f"{digest}-{url.rsplit('/', 1)[-1]}")
        if not os.path.isfile(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(self.read_bytes(url))
            os.replace(tmp, path)
        return path

    def retrying(self, url: str, fn: Callable[[], T]) -> T:
        """``fn()`` with this policy's retries on transient errors (one-shot calls: info, put, rm)."""
        failures, started = 0, time.monotonic()
        while True:
            try:
                return fn()
            except Exception as e:
                failures = self.failed(url, e, failures, started)

    def failed(self, url: str, e: BaseException, failures: int, started: float) -> int:
        """Count one failure: wait and return the new count, or raise if it is permanent or the last."""
        if not transient(e):
            raise e
        failures += 1
        if failures >= self.retries:
            cause = e.__cause__ if isinstance(e, FileNotFoundError) and e.__cause__ is not None else e
            elapsed = time.monotonic() - started
            raise RemoteReadError(f"{url}: giving up after {failures} attempts over {elapsed:.1f} s "
                                  f"(last error: {type(cause).__name__}: {cause})") from e
        wait = min(self.retry_wait * 2 ** (failures - 1), MAX_WAIT)
        time.sleep(wait * random.Random().uniform(0.75, 1.25))  # a private RNG: training noise stays untouched
        return failures

    def _cache(self):
        if not self.cache_dir:
            return None
        from .shardcache import ShardCache

        return ShardCache(self.cache_dir, int(self.cache_max_gb * 2**30))

    # -- writing (converters publish a finished local folder) ---------------------------------------
    def publish(self, folder: str, url: str, overwrite: bool) -> None:
        """Upload a written and validated local shard folder to ``url``, meta.json last.

        A reader opens meta.json first, so until the last upload it sees no dataset (or, when
        replacing, none: the old meta.json goes first), never a half-written one. Each upload is
        checked by size; files of a replaced dataset that the new one does not have are removed.
        """
        if protocol(url) == "pipe":
            raise ValueError(f"{url}: a pipe: URL can be read from, not written to")
        fs, root = filesystem(url, self.options)
        root = root.rstrip("/")
        meta = f"{root}/meta.json"
        old: set[str] = set()
        if self.retrying(url, lambda: fs.exists(meta)):
            if not overwrite:
                raise FileExistsError(f"{url} already holds a dataset (meta.json); pass --overwrite to replace it")
            old = set(self.retrying(url, lambda: [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]))
            self.retrying(url, lambda: fs.rm(meta))
        names = sorted(os.listdir(folder))
        for name in [n for n in names if n != "meta.json"] + ["meta.json"]:
            local, remote = os.path.join(folder, name), f"{root}/{name}"
            self.retrying(join(url, name), lambda: fs.put_file(local, remote))
            fs.invalidate_cache()
            got = self.retrying(join(url, name), lambda: fs.info(remote)["size"])
            if got != os.path.getsize(local):
                raise RemoteReadError(f"{join(url, name)}: uploaded {got} bytes, expected {os.path.getsize(local)}")
        for name in sorted(old - set(names)):
            if name.endswith((".tar", ".json", ".model")):
                self.retrying(url, lambda: fs.rm(f"{root}/{name}"))


def storage_for(data_cfg: Any) -> Storage:
    """The Storage a run's ``data`` config section asks for (duck-typed: data/ never imports config)."""
    return Storage(retries=data_cfg.retries, retry_wait=data_cfg.retry_wait, cache_dir=data_cfg.cache_dir,
                   cache_max_gb=data_cfg.cache_max_gb)


class _Background(threading.Thread):
    """``fn(*args)`` in a daemon thread (a fetch stuck in retries must not hold up the process's exit)."""

    def __init__(self, fn: Callable, *args: Any):
        super().__init__(name="shard-prefetch", daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # handed to the reader, which raises it where the shard is read
            self.error = e

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class _Once:
    """Opener of a prefetched file: the spooled copy first, a fresh read if asked again (tar fallback)."""

    def __init__(self, future, reopen: Callable[[], BinaryIO]):
        self.future, self.reopen = future, reopen

    def __call__(self) -> BinaryIO:
        future, self.future = self.future, None
        return future.result() if future is not None else self.reopen()


