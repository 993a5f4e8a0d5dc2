"""The byte sources behind storage.Storage for remote files: fsspec protocols and pipe: commands.

Each source opens its file at a byte position; ``Retrying`` turns one into a stream that
survives transient failures by reopening where it broke (storage.py says why at that level).
"""
from __future__ import annotations

import io
import re
import shlex
import subprocess
import time
from typing import Any

BLOCK = 8 << 20  # fsspec read-ahead block: a typical shard arrives in one or two range requests
BUFFER = 1 << 20
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 60  # seconds; a stalled server becomes a retried timeout
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def protocol(url: str) -> str:
    """"file" (a local path or file://), "pipe" or the fsspec protocol of a root or file URL."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _URL.match(url)
    return "file" if m is None else m.group(1).lower()


class RemoteReadError(OSError):
    """A remote read failed for good; the message names the URL, the attempts and the last error."""


class _Transient(Exception):
    """A failure worth retrying that the libraries do not raise themselves (short read, dead command)."""


def filesystem(url: str, options: dict) -> tuple[Any, str]:
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
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)})
    elif kind == "s3":
        kwargs.setdefault("config_kwargs", {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                            "retries": {"total_max_attempts": 1}})
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


def transient(e: BaseException) -> bool:
    """Connection resets, timeouts, 5xx, 408/429, short reads and dead commands: worth another try."""
    if isinstance(e, RemoteReadError):
        return False
    if isinstance(e, _Transient):
        return True
    status = getattr(e, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(e, FileNotFoundError) and e.__cause__ is not None:
        return transient(e.__cause__)  # fsspec's HTTP reports "connection refused" as not found, with the cause
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
                             "ProtocolError", "ReadTimeoutError"})
    return False


def open_source(url: str, options: dict):
    """The byte source of a remote URL: a pipe: command or an fsspec file."""
    return _PipeSource(url) if protocol(url) == "pipe" else _FsspecSource(url, options)


class Retrying(io.RawIOBase):
    """A remote file as a raw stream that survives transient failures by reopening at its position."""

    def __init__(self, url: str, source, storage: Any):
        """``storage.failed(url, error, failures, started)`` decides: wait and go on, or raise."""
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
            self.fs, self.path = filesystem(self.url, self.options)
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
