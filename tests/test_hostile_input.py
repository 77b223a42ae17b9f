"""Hostile input against a live server.py: every client-caused failure is a 4xx naming the
problem, and the server goes on serving (a good request on the same connection after each)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.helpers import SIDE, data_url, png_bytes, png_header_only, rand_image, running_server

MODEL = "ovis-hostile"
FETCH_TIMEOUT = 8
# Loaded by every server process (PYTHONPATH): this one host name takes 60 s to look up.
SLOW_HOST = "slow-resolver.test"
SLOW_RESOLVER = f"""
import socket, time
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host == {SLOW_HOST!r}:
        time.sleep(60)
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""
MAX_REQUEST_BYTES = 4 << 20
MAX_PIXELS = 1_000_000  # the server's --mm-processor-kwargs cap
GOOD_IMAGE = png_bytes(rand_image(2 * SIDE, SIDE, 11))


def with_part(part: dict) -> dict:
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}]}


def with_url(url) -> dict:
    return with_part({"type": "image_url", "image_url": {"url": url}})


def with_kwargs(kwargs) -> dict:
    return {**with_url(data_url(GOOD_IMAGE)), "mm_processor_kwargs": kwargs}


NON_PUBLIC = "non-public address"
# (request body fields, HTTP status, what the error message must contain)
CASES = {
    # local files (this server allows one directory: see `media_dir`)
    "file outside the allowed dir": (with_url("file:///etc/passwd"), 400, "allowed-local-media-path"),
    "file escaping with ..": (lambda d: with_url(f"file://{d}/../outside.png"), 400, "allowed-local-media-path"),
    "missing file in the allowed dir": (lambda d: with_url(f"file://{d}/missing.png"), 400, "cannot read"),
    # schemes
    "ftp url": (with_url("ftp://example.com/cat.png"), 400, "unsupported image url"),
    "gopher url": (with_url("gopher://example.com/1"), 400, "unsupported image url"),
    "javascript url": (with_url("javascript:alert(1)"), 400, "unsupported image url"),
    "garbage url": (with_url("not a url at all"), 400, "unsupported image url"),
    "data url without base64": (with_url("data:image/png,abc"), 400, "base64"),
    "data url without data": (with_url("data:image/png;base64"), 400, "missing ','"),
    "http url with a port out of range": (with_url("http://example.com:99999/x.png"), 400, "invalid image url"),
    "http url with a broken ipv6 host": (with_url("http://[::1/x.png"), 400, "invalid image url"),
    # loopback, private and link-local hosts under the default policy 'public'
    "loopback": (with_url("http://127.0.0.1:9/x.png"), 400, NON_PUBLIC),
    "ipv6 loopback": (with_url("http://[::1]/x.png"), 400, NON_PUBLIC),
    "ipv4-mapped ipv6 loopback": (with_url("http://[::ffff:127.0.0.1]/x.png"), 400, NON_PUBLIC),
    "decimal loopback": (with_url("http://2130706433/x.png"), 400, NON_PUBLIC),
    "hex loopback": (with_url("http://0x7f000001/x.png"), 400, NON_PUBLIC),
    "short loopback": (with_url("http://127.1/x.png"), 400, NON_PUBLIC),
    "octal loopback": (with_url("http://0177.0.0.1/x.png"), 400, NON_PUBLIC),
    "localhost": (with_url("http://localhost:8000/x.png"), 400, NON_PUBLIC),
    "userinfo before loopback": (with_url("http://example.com@127.0.0.1/x.png"), 400, NON_PUBLIC),
    "unspecified address": (with_url("http://0.0.0.0/x.png"), 400, NON_PUBLIC),
    "cloud metadata (link-local)": (with_url("http://169.254.169.254/latest/meta-data"), 400, NON_PUBLIC),
    "ipv6 link-local": (with_url("http://[fe80::1]/x.png"), 400, NON_PUBLIC),
    "private 10/8": (with_url("https://10.0.0.1/x.png"), 400, NON_PUBLIC),
    "private 192.168/16": (with_url("http://192.168.1.1/x.png"), 400, NON_PUBLIC),
    "carrier-grade nat": (with_url("http://100.64.0.1/x.png"), 400, NON_PUBLIC),
    "unresolvable host": (with_url("http://no-such-host.invalid/x.png"), 400, "cannot resolve"),
    # image_url parts without a url
    "image_url without url": (with_part({"type": "image_url", "image_url": {}}), 400, "url"),
    "image_url with a null url": (with_part({"type": "image_url", "image_url": {"url": None}}), 400, "url"),
    "image_url with an empty url": (with_url(""), 400, "empty url"),
    "image_url part without image_url": (with_part({"type": "image_url"}), 400, "image_url"),
    # mm_processor_kwargs (the server trusts request kwargs)
    "unknown kwarg": (with_kwargs({"foo": 1}), 400, "unknown Ovis mm_processor_kwargs ['foo']"),
    "max_partition a string": (with_kwargs({"max_partition": "4"}), 400, "max_partition must be an integer"),
    "max_partition a float": (with_kwargs({"max_partition": 2.5}), 400, "max_partition must be an integer"),
    "max_partition a bool": (with_kwargs({"max_partition": True}), 400, "max_partition must be an integer"),
    "max_partition a list": (with_kwargs({"max_partition": [4]}), 400, "max_partition must be an integer"),
    "max_partition zero": (with_kwargs({"max_partition": 0}), 400, "max_partition must be an integer >= 1"),
    "max_partition above the server's": (with_kwargs({"max_partition": 100}), 400, "above this server's 9"),
    "covering_threshold a string": (with_kwargs({"covering_threshold": "x"}), 400, "covering_threshold must be a number"),
    "covering_threshold negative": (with_kwargs({"covering_threshold": -1}), 400, "covering_threshold must be a number in (0, 1]"),
    "covering_threshold above 1": (with_kwargs({"covering_threshold": 5}), 400, "covering_threshold must be a number in (0, 1]"),
    "max_pixels zero": (with_kwargs({"max_pixels": 0}), 400, "max_pixels must be an integer >= 1"),
    "max_pixels above the server's": (with_kwargs({"max_pixels": 10**30}), 400, f"above this server's {MAX_PIXELS}"),
    "mm_processor_kwargs a list": (with_kwargs([1]), 400, "mm_processor_kwargs"),
    # pixel caps
    "image over the pixel cap": (with_url(data_url(png_bytes(rand_image(1100, 1000, 3)))), 400, "max_pixels"),
    "decompression bomb": (with_url(data_url(png_header_only(50000, 50000))), 400, "decompression bomb"),
    # request bodies
    "body over the cap": (b'{"model": "' + b"x" * MAX_REQUEST_BYTES + b'"}', 413, "--max-request-bytes"),
    "chunked body over the cap": (iter([b"x" * (1 << 20)] * 5), 413, "--max-request-bytes"),
    "malformed json": (b'{"model": "ovis-hostile", "messages": [', 400, "json"),
}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    (path / "allowed.png").write_bytes(GOOD_IMAGE)
    (path.parent / "outside.png").write_bytes(GOOD_IMAGE)
    return path


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_dir, tmp_path_factory):
    args = ["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
            "--enforce-eager", "--max-num-seqs", "8", "--seed", "0", "--trust-request-mm-kwargs",
            "--mm-processor-kwargs", json.dumps({"max_pixels": MAX_PIXELS}),
            "--allowed-local-media-path", str(media_dir),
            "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "sitecustomize.py").write_text(SLOW_RESOLVER)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OVIS_IMAGE_URLS": "public", "PYTHONPATH": str(tmp),
           "VLLM_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT)}
    with running_server(args, tmp / "server.log", env=env) as base:
        yield base


GOOD_REQUEST = {"model": MODEL, "max_tokens": 4, "temperature": 0, **with_url(data_url(GOOD_IMAGE))}


def good_answer(http: httpx.Client) -> str:
    response = http.post("/v1/chat/completions", json=GOOD_REQUEST)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_hostile_requests_are_clear_4xx_and_the_server_keeps_serving(server, media_dir):
    failures = []
    with httpx.Client(base_url=server, timeout=120) as http:
        want = good_answer(http)
        for name, (body, status, needle) in CASES.items():
            body = body(media_dir) if callable(body) else body
            if isinstance(body, dict):
                body = json.dumps({"model": MODEL, "max_tokens": 4, **body}).encode()
            response = http.post("/v1/chat/completions", content=body,
                                 headers={"Content-Type": "application/json"})
            if response.status_code != status or needle.lower() not in response.text.lower():
                failures.append(f"{name}: HTTP {response.status_code} {response.text[:300]}")
            # The same connection (or a new one, after a 413) serves the next client.
            assert good_answer(http) == want, name
    assert not failures, "\n".join(failures)
    # And the official client, on a fresh connection.
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                           **with_url(data_url(GOOD_IMAGE)))
    assert reply.choices[0].message.content == want


def test_local_file_in_the_allowed_directory_is_served(server, media_dir):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    answers = [client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, **with_url(url))
               .choices[0].message.content
               for url in ((media_dir / "allowed.png").as_uri(), data_url(GOOD_IMAGE))]
    assert answers[0] == answers[1]


def test_a_slow_resolver_stalls_no_one_else(server):
    """While one request's image host takes 60 s to look up, other requests are answered, and
    that one gets a 400 when the fetch timeout runs out."""
    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            slow = asyncio.create_task(http.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 4, **with_url(f"http://{SLOW_HOST}/x.png")}))
            await asyncio.sleep(0.5)  # its lookup is under way
            others = await asyncio.gather(*[http.post("/v1/chat/completions", json=GOOD_REQUEST)
                                            for _ in range(4)])
            answered_first = not slow.done()
            return others, answered_first, await slow

    others, answered_first, slow = asyncio.run(run())
    assert [r.status_code for r in others] == [200] * 4 and answered_first
    assert slow.status_code == 400 and f"took longer than {FETCH_TIMEOUT} s" in slow.text, slow.text
