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
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
BLOCK = 8 << 20  # fsspec read-ahead block: a typical shard arrives in one or two range requests
BUFFER = 1 << 20
SPOOL_BYTES = 64 << 20  # a prefetched shard beyond this goes to a temporary file
MAX_WAIT = 30.0
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 60  # seconds; a stalled server becomes a retried timeout
T = TypeVar("T")


class RemoteReadError(OSError):
    """A remote read failed for good; the message names the URL, the attempts and the last error."""


class _Transient(Exception):
    """A failure worth retrying that the libraries do not raise themselves (short read, dead command)."""


def protocol(url: str) -> str:
    """"file" (a local path or file://), "pipe" or the fsspec protocol of a root or file URL."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _URL.match(url)
    return "file" if m is None else m.group(1).lower()


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


def _filesystem(url: str, options: dict) -> tuple[Any, str]:
    """(fsspec filesystem, path) with timeouts set and the library's own retries off (we retry)."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:
        raise ImportError(f"{url}: reading URLs needs fsspec (pip install fsspec): {e}") from None
    kind = protocol(url)
    kwargs = dict(options.get(kind, {}))
    if kind in ("http", "https"):
        import aiohttp

        kwargs.setdefault("client_kwargs", {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)})  # fmt: skip
    elif kind == "s3":
        kwargs.setdefault("config_kwargs", {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                            "retries": {"total_max_attempts": 1}})  # fmt: skip
    try:
        fs, path = url_to_fs(url, **kwargs)
        if kind == "s3":
            fs.retries = 1  # s3fs retries 5 times with its own backoff; one policy (ours) is enough
        return fs, path
    except ImportError as e:
        raise ImportError(f"{url}: protocol {kind!r} needs its fsspec package ({e})") from None
    except ValueError as e:
        known = "file, http(s), s3 (with s3fs) and the other fsspec protocols"
        raise ValueError(f"{url}: unknown protocol {kind!r} ({e}); known: {known}, or pipe:COMMAND") from None


def _transient(e: BaseException) -> bool:
    """Connection resets, timeouts, 5xx, 408/429, short reads and dead commands: worth another try."""
    if isinstance(e, RemoteReadError):
        return False
    if isinstance(e, _Transient):
        return True
    status = getattr(e, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(e, FileNotFoundError) and e.__cause__ is not None:
        return _transient(e.__cause__)  # fsspec's HTTP reports "connection refused" as not found, with the cause
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(e, (OSError, EOFError)):  # ConnectionError, TimeoutError, socket errors, s3fs's EIO for 5xx
        return True
    module = type(e).__module__.split(".")[0]
    if module == "aiohttp":  # payload errors, server disconnects
        return True
    if module in ("botocore", "aiobotocore", "urllib3"):
        names = {c.__name__ for c in type(e).__mro__}
        return bool(names & {"ConnectionError", "HTTPClientError", "IncompleteReadError", "ResponseStreamingError",
                             "ProtocolError", "ReadTimeoutError"})  # fmt: skip
    return False


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
        raw: io.RawIOBase = _Retrying(url, self._source(url), self)
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
        pool, ahead = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch"), None
        try:
            ahead = pool.submit(self._spool, urls[0], version) if urls else None
            for k, url in enumerate(urls):
                current = ahead
                ahead = pool.submit(self._spool, urls[k + 1], version) if k + 1 < len(urls) else None
                yield _Once(current, functools.partial(self.open, url, version))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if ahead is not None and ahead.done() and ahead.exception() is None:
                ahead.result().close()

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
        fs, path = _filesystem(url, self.options)

        def info() -> bool:  # not fs.isfile: fsspec's HTTP version reads any failure (a 503 too) as "no"
            try:
                return fs.info(path).get("type", "file") == "file"
            except FileNotFoundError:
                return False

        return self.retrying(url, info)

    def local_copy(self, url: str) -> str:
        """A local path holding the file (itself when local; else a copy in the cache or temp folder)."""
        if not is_remote(url):
            return local_path(url)
        import hashlib

        folder = self.cache_dir or os.path.join(tempfile.gettempdir(), f"meme_scale-{os.getuid()}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, hashlib.sha256(url.encode()).hexdigest()[:24] + "-" + url.rsplit("/", 1)[-1])
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
        if not _transient(e):
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

    def _source(self, url: str):
        return _PipeSource(url) if protocol(url) == "pipe" else _FsspecSource(url, self.options)

    # -- writing (converters publish a finished local folder) ---------------------------------------
    def publish(self, folder: str, url: str, overwrite: bool) -> None:
        """Upload a written and validated local shard folder to ``url``, meta.json last.

        A reader opens meta.json first, so until the last upload it sees no dataset (or, when
        replacing, none: the old meta.json goes first), never a half-written one. Each upload is
        checked by size; files of a replaced dataset that the new one does not have are removed.
        """
        if protocol(url) == "pipe":
            raise ValueError(f"{url}: a pipe: URL can be read from, not written to")
        fs, root = _filesystem(url, self.options)
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


class _Once:
    """Opener of a prefetched file: the spooled copy first, a fresh read if asked again (tar fallback)."""

    def __init__(self, future, reopen: Callable[[], BinaryIO]):
        self.future, self.reopen = future, reopen

    def __call__(self) -> BinaryIO:
        future, self.future = self.future, None
        return future.result() if future is not None else self.reopen()


class _Retrying(io.RawIOBase):
    """A remote file as a raw stream that survives transient failures by reopening at its position."""

    def __init__(self, url: str, source, storage: Storage):
        super().__init__()
        self.url, self.source, self.storage = url, source, storage
        self.pos, self.size, self.f = 0, None, None
        self.failures, self.started = 0, time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            try:
                if self.f is None:
                    self.f, size = self.source.open_at(self.pos)
                    if self.size is not None and size is not None and size != self.size:
                        raise RemoteReadError(f"{self.url} changed while being read ({self.size} bytes, now {size})")
                    self.size = size if size is not None else self.size
                n = self.f.readinto(buf)
                if not n:
                    if self.size is not None and self.pos < self.size:
                        raise _Transient(f"connection ended at byte {self.pos} of {self.size}")
                    self.source.check_end(self.f)
                    return 0
                self.pos += n
                self.failures = 0
                return n
            except Exception as e:
                self._drop()
                self.failures = self.storage.failed(self.url, e, self.failures, self.started)

    def _drop(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # closing a broken connection may fail too; it is gone either way
                pass

    def close(self) -> None:
        self._drop()
        super().close()


class _FsspecSource:
    """Opens an fsspec file at a byte position (a range request on HTTP and S3)."""

    def __init__(self, url: str, options: dict):
        self.url, self.options = url, options
        self.fs = self.path = None

    def open_at(self, pos: int) -> tuple[Any, int | None]:
        if self.fs is None:
            self.fs, self.path = _filesystem(self.url, self.options)
        f = self.fs.open(self.path, "rb", block_size=BLOCK)
        if pos:
            f.seek(pos)
        return f, getattr(f, "size", None)

    def check_end(self, f) -> None:
        pass


class _PipeSource:
    """Runs the command of a ``pipe:`` URL; reopening at byte n reruns it and skips n bytes."""

    def __init__(self, url: str):
        self.url = url
        self.argv = shlex.split(url[len("pipe:"):])
        if not self.argv:
            raise ValueError(f"{url!r}: a pipe: URL needs a command")

    def open_at(self, pos: int) -> tuple[Any, None]:
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: command {self.argv[0]!r} not found") from None
        f = _PipeFile(proc)
        while pos:
            skipped = len(f.read(min(pos, BUFFER)))
            if not skipped:
                self.check_end(f)
                raise _Transient(f"output ended after {pos} fewer bytes than before")
            pos -= skipped
        return f, None

    def check_end(self, f: "_PipeFile") -> None:
        code = f.proc.wait()
        if code != 0:
            raise _Transient(f"command exited with status {code}")


class _PipeFile:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def read(self, n: int) -> bytes:
        return self.proc.stdout.read(n)

    def readinto(self, buf) -> int:
        return self.proc.stdout.readinto(buf)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
