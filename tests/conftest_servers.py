"""Real servers for remote-shard tests, started as processes on 127.0.0.1 (imported as ``conftest_servers``).

- ``HttpShards``: tools/serve_shards.py serving a folder (GET with Range, HEAD); can be killed
  and restarted on the same port.
- ``S3Server``: moto's standalone S3-API server (``moto_server``, from ``moto[server]``), one bucket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from meme_scale.engine import free_port

SERVE = Path(__file__).resolve().parent.parent / "tools" / "serve_shards.py"
BIN = Path(sys.executable).parent


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class HttpShards:
    def __init__(self, root: str, *flags: str):
        self.root, self.flags, self.port = root, flags, free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE), self.root, str(self.port), *self.flags],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> HttpShards:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class S3Server:
    """moto_server on a free port; ``env`` points boto/s3fs at it (fake credentials)."""

    def __init__(self, bucket: str = "shards"):
        self.port, self.bucket = free_port(), bucket
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.port, self.proc)
        self.env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict:
        """Storage options for s3:// URLs on this server (so forkserver workers need no environment)."""
        return {"s3": {"endpoint_url": self.endpoint, "key": "test", "secret": "test"}}

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options["s3"])

    def upload(self, folder: str, prefix: str) -> str:
        """Copy a local shard folder to s3://bucket/prefix; returns that URL."""
        fs = self.fs
        for name in sorted(os.listdir(folder)):
            fs.put_file(os.path.join(folder, name), f"{self.bucket}/{prefix}/{name}")
        return f"s3://{self.bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
