"""The client's training calls against a scripted transport (no server): request shapes, and watch_training's
stream handling (repeats skipped, a dropped stream reopened, errors raised), sync and async."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from prefixserve.adapters.errors import BadRequestError, NotFoundError, PrefixServeError
from prefixserve.client import AsyncClient, Client, RetryPolicy

NO_WAIT = RetryPolicy(max_retries=2, backoff_s=0.0, max_backoff_s=0.0)


def record(state: str, epoch: int, updated: float) -> dict[str, Any]:
    return {
        "job_id": "job_1",
        "state": state,
        "prefix_id": "s",
        "dataset_id": "ds_1",
        "options": {"kind": "prefix"},
        "created": 1.0,
        "updated": updated,
        "epoch": epoch,
        "epochs": 2,
        "history": [
            {"epoch": e, "train_loss": 0.5, "epoch_time_s": 1.0, "eval_accuracy": 0.8} for e in range(1, epoch + 1)
        ],
        "result": {"published": True, "version": 4} if state == "succeeded" else None,
    }


def stream(*records: dict[str, Any], keepalive: bool = True) -> bytes:
    parts = [": keep-alive\n\n"] if keepalive else []
    parts += [f"event: job\ndata: {json.dumps(r)}\n\n" for r in records]
    return "".join(parts).encode()


class Script:
    """Answers each request with the next scripted (status, body); records the requests."""

    def __init__(self, *answers: tuple[int, bytes]):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.pop(0)
        kind = "text/event-stream" if request.url.path.endswith("/events") and status == 200 else "application/json"
        return httpx.Response(status, content=body, headers={"content-type": kind})


def error(code: str, status: int) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"code": code, "message": code}}).encode()


def test_watch_skips_repeats_and_reopens_a_dropped_stream():
    queued, running, done = record("queued", 0, 1.0), record("running", 1, 2.0), record("succeeded", 2, 3.0)
    script = Script((200, stream(queued, running)), (503, b"{}"), (200, stream(running, done)))
    with Client("http://t", api_key="k", transport=httpx.MockTransport(script), retry=NO_WAIT) as c:
        seen = list(c.watch_training("job_1"))
    assert [(j.state, j.epoch) for j in seen] == [("queued", 0), ("running", 1), ("succeeded", 2)]
    assert seen[-1].done and seen[-1].published_version == 4 and seen[-1].history[1].eval_accuracy == 0.8
    assert [r.url.path for r in script.requests] == ["/v1/training-jobs/job_1/events"] * 3

    script = Script((200, stream(queued)), (200, stream(queued)), (200, stream(queued)))  # never progresses
    client = Client("http://t", api_key="k", transport=httpx.MockTransport(script), retry=NO_WAIT)
    with client as c, pytest.raises(PrefixServeError) as err:
        list(c.watch_training("job_1"))
    assert err.value.code == "unreachable" and len(script.requests) == 3  # max_retries reopenings, then give up

    script = Script(error("not_found", 404))
    client = Client("http://t", api_key="k", transport=httpx.MockTransport(script), retry=NO_WAIT)
    with client as c, pytest.raises(NotFoundError):
        list(c.watch_training("job_1"))


def test_async_watch_and_calls():
    done = record("succeeded", 2, 3.0)
    events = b'event: error\ndata: {"error": {"code": "store_unavailable", "message": "down"}}\n\n'
    script = Script((200, stream(done)), (202, json.dumps(done).encode()), (200, events))

    async def main() -> tuple[list[Any], Any]:
        async with AsyncClient("http://t", api_key="k", transport=httpx.MockTransport(script), retry=NO_WAIT) as c:
            seen = [j async for j in c.watch_training("job_1")]
            cancelled = await c.cancel_training("job_1")
            with pytest.raises(PrefixServeError) as err:  # an error event ends the watch with the server's error
                [j async for j in c.watch_training("job_1")]
            assert err.value.code == "store_unavailable"
            return seen, cancelled

    seen, cancelled = asyncio.run(main())
    assert [j.state for j in seen] == ["succeeded"] and cancelled.job_id == "job_1"
    assert script.requests[1].method == "DELETE"


def test_submit_and_upload_requests(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text,label\ngood,1\n", encoding="utf-8")
    answer = (202, json.dumps(record("queued", 0, 1.0)).encode())
    uploaded = {"dataset_id": "ds_1", "format": "csv", "name": "train.csv", "bytes": 18, "sha256": "x", "rows": 1}
    script = Script(answer, answer, (201, json.dumps({**uploaded, "bad_rows": {}, "labels": ["1"]}).encode()))
    with Client("http://t", api_key="k", transport=httpx.MockTransport(script)) as c:
        c.submit_training("s", data=data, kind="lora", lora_r=4, lr=None)
        c.submit_training("s", dataset_id="ds_1", epochs=2)
        ds = c.upload_dataset(data, label_column="label")
        with pytest.raises(BadRequestError):
            c.submit_training("s")  # no data at all
        with pytest.raises(BadRequestError):
            c.submit_training("s", data=b"\xff\xfe", format="tsv")  # not UTF-8: refused before sending
    inline, stored, upload = (json.loads(r.content) if r.method == "POST" and r.url.path != "/v1/datasets" else r
                              for r in script.requests)  # fmt: skip
    assert inline == {
        "prefix_id": "s",
        "kind": "lora",
        "lora_r": 4,  # lr=None is not sent: the server's default applies
        "dataset": {"format": "csv", "content": "text,label\ngood,1\n", "name": "train.csv"},
    }
    assert stored == {"prefix_id": "s", "epochs": 2, "dataset_id": "ds_1"}
    assert upload.url.params["format"] == "csv" and upload.url.params["name"] == "train.csv"
    assert upload.url.params["label_column"] == "label" and upload.content == data.read_bytes()
    assert ds.rows == 1 and ds.labels == ("1",) and len(script.requests) == 3
