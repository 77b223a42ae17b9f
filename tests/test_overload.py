"""Overload ends in queueing or a clear 503, not in unbounded memory: request bodies being
processed at once are bounded (--max-pending-bytes); a request that finds no room waits in line
and, after --pending-timeout, gets HTTP 503 with Retry-After naming the setting."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from tests.helpers import data_url, rand_image, running_server

MODEL = "ovis"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("overload") / "server.log"
    # Every request below is larger than the budget, so they are admitted one at a time.
    args = ["--model", str(tiny_checkpoint), "--served-model-name", MODEL,
            "--max-pending-bytes", "1000000", "--pending-timeout", "1"]
    with running_server(args, log) as base:
        yield base


def photo_request(seed: int) -> dict:
    buf = io.BytesIO()
    rand_image(2400, 1800, seed).save(buf, format="JPEG", quality=90)
    url = data_url(buf.getvalue(), "image/jpeg")
    return {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": url}} for _ in range(2)),
        {"type": "text", "text": f"Photo {seed}?"}]}]}


def test_burst_queues_then_refuses_with_503(server):
    bodies = [photo_request(seed) for seed in range(40)]
    assert all(len(str(b)) > 1_000_000 for b in bodies)
    # First-request costs out of the way: the burst below only queues behind processing.
    assert httpx.post(server + "/v1/chat/completions", json=bodies[-1], timeout=120).status_code == 200

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return await asyncio.gather(*[http.post("/v1/chat/completions", json=b) for b in bodies])

    replies = asyncio.run(burst())
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 503}, [(r.status_code, r.text[:200]) for r in replies]
    # One at a time fits the budget: a second answer means a request waited in line and got in.
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "--max-pending-bytes" in refused.json()["error"]["message"]
    # The budget is free again once the burst is over.
    again = httpx.post(server + "/v1/chat/completions", json=bodies[0], timeout=120)
    assert again.status_code == 200, again.text


def test_a_body_refused_after_admission_frees_its_room(server):
    """A body the middleware itself refuses once admitted (both names of the thinking budget)
    gives its bytes back: with the budget below one body, a leak would leave every later
    request waiting for room that never comes (503)."""
    both = photo_request(100) | {"thinking_budget": 3, "thinking_token_budget": 3}
    assert len(str(both)) > 1_000_000
    for _ in range(2):
        refused = httpx.post(server + "/v1/chat/completions", json=both, timeout=120)
        assert refused.status_code == 400 and "not both" in refused.json()["error"]["message"], refused.text
    after = httpx.post(server + "/v1/chat/completions", json=photo_request(101), timeout=120)
    assert after.status_code == 200, after.text
