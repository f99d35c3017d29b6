"""nesta_ray.io.storage (URIs and pre-flight probes) against real local folders and a real moto S3 server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from nesta_ray.errors import StorageError
from nesta_ray.io import storage


def test_join_keeps_scheme_and_single_slashes():
    assert storage.join("s3://b/", "/runs/", "r1/x") == "s3://b/runs/r1/x"
    assert storage.join("s3://", "b", "k") == "s3://b/k"
    assert storage.join("file:///tmp/a/", "b") == "file:///tmp/a/b"
    assert storage.join("/", "a") == "/a"
    assert storage.join("rel/dir", "a") == "rel/dir/a"


def test_check_storage_good_targets(s3_server, tmp_path):
    bucket = s3_server.make_bucket(f"b-{uuid.uuid4().hex[:12]}")
    storage.check_storage(f"{bucket}/out/run", s3_server.storage_options, write=True)
    fs, _ = storage.url_to_fs(bucket, {**s3_server.storage_options, "skip_instance_cache": True})
    assert fs.find(bucket.removeprefix("s3://")) == []  # the probe object was deleted
    storage.check_storage(bucket, s3_server.storage_options, write=False)
    storage.check_storage(str(tmp_path / "new" / "dir"), write=True)
    assert os.listdir(tmp_path / "new" / "dir") == []
    with pytest.raises(StorageError, match="does not exist"):
        storage.check_storage(str(tmp_path / "absent"), write=False)


@pytest.mark.parametrize("write", [True, False])
def test_check_storage_missing_bucket(s3_server, write):
    name = f"nope-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError) as ei:
        storage.check_storage(f"s3://{name}/out", s3_server.storage_options, write=write)
    msg = str(ei.value)
    assert "\n" not in msg and f"bucket '{name}' does not exist" in msg and "create it" in msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_storage_unreachable_endpoint_fails_fast(s3_server):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the storage endpoint") as ei:
        storage.check_storage("s3://bucket/out", opts, write=True)
    assert time.monotonic() - t0 < 10
    assert "\n" not in str(ei.value) and "s3://bucket/out" in str(ei.value)


def test_check_storage_bad_credentials(s3_server):
    """moto reads INITIAL_NO_AUTH_ACTION_COUNT when it is imported, so an in-process ThreadedMotoServer cannot
    enforce auth without changing global state shared with ``s3_server``: run a separate moto_server process."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("could not start an auth-enforcing moto_server process")
                time.sleep(0.05)
        opts = {"key": "AKIAUNKNOWN", "secret": "wrong", "client_kwargs": {"endpoint_url": endpoint}}
        for write in (True, False):
            with pytest.raises(StorageError, match="refused the credentials") as ei:
                storage.check_storage("s3://bucket/out", opts, write=write)
            assert "\n" not in str(ei.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_check_storage_silent_endpoint_fails_fast(s3_server):
    """An endpoint that accepts connections but never answers must not hang the preflight."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        opts = {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}"}}
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
            storage.check_storage("s3://bucket/out", opts, write=True)
        assert time.monotonic() - t0 < 12
