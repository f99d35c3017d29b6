"""BackgroundUploads: one upload in flight, in order, and an upload's error is raised, never dropped."""

import threading
import time

import pytest

from nesta_ray.pipeline.uploads import BackgroundUploads


def test_uploads_run_one_at_a_time_in_order_and_wait_returns_when_all_landed():
    landed, busy, overlap = [], threading.Lock(), []

    def upload(i):
        if not busy.acquire(blocking=False):
            overlap.append(i)
            return
        time.sleep(0.02)
        landed.append(i)
        busy.release()

    uploads = BackgroundUploads()
    start = time.perf_counter()
    uploads.submit(upload, 0)
    assert time.perf_counter() - start < 0.015  # submit does not wait for the upload it starts
    for i in range(1, 4):
        uploads.submit(upload, i)
    uploads.wait()
    assert landed == [0, 1, 2, 3] and overlap == []


def test_an_upload_error_is_raised_by_the_next_call():
    def fail():
        raise OSError("bucket gone")

    uploads = BackgroundUploads()
    uploads.submit(fail)
    with pytest.raises(OSError, match="bucket gone"):
        uploads.submit(lambda: None)
    uploads.submit(fail)
    with pytest.raises(OSError, match="bucket gone"):
        uploads.wait()
    uploads.wait()  # reported once; nothing in flight now
