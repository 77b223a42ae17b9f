"""engine/media.py's URL fetching against loopback HTTP servers started here: the byte cap,
redirects checked hop by hop, connections only to the checked addresses, and name lookups that
neither block the event loop nor outlast the timeout."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import threading
import time
import urllib.parse

import pytest

from ovis_vllm.engine import media
from tests.helpers import png_bytes, rand_image

IMAGE = png_bytes(rand_image(40, 30, 4))
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def only_loopback(address) -> bool:
    """An address predicate for tests: the loopback servers here are the only 'public' hosts."""
    return address == LOOPBACK


class Handler(http.server.BaseHTTPRequestHandler):
    """/image: the PNG; /big: 1 MiB with its length; /stream: 1 MiB without a length;
    /redirect?to=URL: 302 to URL; every request's Host header is kept in `hosts`."""

    hosts: list[str] = []

    def do_GET(self):
        self.hosts.append(self.headers["Host"])
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(self.path.split("=", 1)[1]))
            self.end_headers()
        elif self.path == "/image":
            self._send(IMAGE)
        elif self.path == "/big":
            self._send(b"x" * (1 << 20))
        elif self.path == "/stream":  # HTTP/1.0, no Content-Length: the body ends at close
            self.send_response(200)
            self.end_headers()
            for _ in range(16):
                self.wfile.write(b"x" * (64 << 10))
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that stops reading at the byte cap breaks the pipe: expected here


@pytest.fixture(scope="module")
def origin():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def names(monkeypatch):
    """Host names this test makes up, resolved by a replaced `media.lookup`; each lookup is
    counted in `names["calls"]`."""
    table: dict = {"calls": []}
    real_lookup = media.lookup

    def lookup(host, port):
        table["calls"].append(host)
        if host not in table:
            return real_lookup(host, port)
        answer = table[host]
        return answer() if callable(answer) else answer

    monkeypatch.setattr(media, "lookup", lookup)
    return table


def fetch(url, **kwargs):
    kwargs.setdefault("timeout", 10)
    kwargs.setdefault("allowed", only_loopback)
    kwargs.setdefault("max_bytes", 4 << 20)
    kwargs.setdefault("redirects", 0)
    return asyncio.run(media.fetch_url_bytes(url, **kwargs))


def test_fetches_under_the_byte_cap(origin):
    assert fetch(origin + "/image") == IMAGE
    assert len(fetch(origin + "/big", max_bytes=1 << 20)) == 1 << 20


@pytest.mark.parametrize("path", ["/big", "/stream"])
def test_byte_cap(origin, path):
    """Refused from the declared length, or while reading a body without one."""
    with pytest.raises(ValueError, match="above this server's cap of 1000 bytes"):
        fetch(origin + path, max_bytes=1000)


def test_redirects_only_when_enabled_and_each_hop_checked(origin, names):
    names["private.test"] = ["10.1.2.3"]
    one_hop = f"{origin}/redirect?to={origin}/image"
    with pytest.raises(ValueError, match="redirects .*follows at most 0 redirect"):
        fetch(one_hop)
    assert fetch(one_hop, redirects=1) == IMAGE
    with pytest.raises(ValueError, match="follows at most 1 redirect"):
        fetch(f"{origin}/redirect?to={one_hop}", redirects=1)
    # A public first hop redirecting to a private host: refused before connecting there.
    for target in ("http://private.test/x.png", "http://[::1]/x.png", "http://169.254.169.254/latest"):
        names["calls"].clear()
        with pytest.raises(ValueError, match="non-public address"):
            fetch(f"{origin}/redirect?to={target}", redirects=3)
    assert names["calls"] == ["127.0.0.1", "169.254.169.254"]
    with pytest.raises(ValueError, match="not an http"):
        fetch(f"{origin}/redirect?to=file:///etc/passwd", redirects=3)


def test_connects_only_to_the_checked_addresses(origin, names):
    """A name is looked up once per hop and the connection goes to that answer: a second answer
    (DNS rebinding) never gets a chance. The Host header is the URL's."""
    port = origin.rsplit(":", 1)[1]
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    names["rebind.test"] = lambda: next(answers)
    Handler.hosts.clear()
    assert fetch(f"http://rebind.test:{port}/image") == IMAGE
    assert names["calls"] == ["rebind.test"] and Handler.hosts == [f"rebind.test:{port}"]


@pytest.fixture
def tls_origin(tmp_path, monkeypatch):
    """An https server on 127.0.0.1 whose self-signed certificate names only pinned.test, which
    the fetch trusts (aiohttp's verifying context swapped for one with this certificate)."""
    import shutil
    import ssl
    import subprocess

    import aiohttp.connector

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=pinned.test",
                    "-addext", "subjectAltName=DNS:pinned.test"], check=True, capture_output=True)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", ssl.create_default_context(cafile=cert))
    yield httpd.server_address[1]
    httpd.shutdown()


def test_tls_checks_the_url_host_on_the_pinned_address(tls_origin, names):
    """Connected to the checked address, TLS still verifies the certificate against the URL's
    host name (sent as SNI), and the Host header is the URL's."""
    names["pinned.test"] = ["127.0.0.1"]
    Handler.hosts.clear()
    assert fetch(f"https://pinned.test:{tls_origin}/image") == IMAGE
    assert Handler.hosts == [f"pinned.test:{tls_origin}"]
    with pytest.raises(ValueError, match="certificate"):  # the certificate does not name the address
        fetch(f"https://127.0.0.1:{tls_origin}/image")


def test_a_slow_lookup_times_out_without_stalling_others(origin, names):
    names["slow.test"] = lambda: time.sleep(3) or ["127.0.0.1"]

    async def run():
        loop = asyncio.get_running_loop()
        ticks = []

        async def ticker():  # the event loop stays free while the lookup blocks its thread
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.05)

        tick = asyncio.create_task(ticker())
        start = loop.time()
        slow = asyncio.create_task(media.fetch_url_bytes(
            "http://slow.test/x.png", timeout=1, allowed=only_loopback, max_bytes=1 << 20, redirects=0))
        fast = await media.fetch_url_bytes(origin + "/image", timeout=10, allowed=only_loopback,
                                           max_bytes=1 << 20, redirects=0)
        fast_done = loop.time() - start
        with pytest.raises(ValueError, match="took longer than 1 s"):
            await slow
        slow_done = loop.time() - start
        tick.cancel()
        return fast, fast_done, slow_done, max(b - a for a, b in zip(ticks, ticks[1:]))

    fast, fast_done, slow_done, longest_gap = asyncio.run(run())
    assert fast == IMAGE and fast_done < 0.9
    assert 0.9 < slow_done < 2.5
    assert longest_gap < 0.5


def test_policy_from_the_environment(origin, monkeypatch):
    monkeypatch.setenv("OVIS_IMAGE_URLS", "off")
    with pytest.raises(ValueError, match="disabled"):
        asyncio.run(media.fetch_url_bytes(origin + "/image", timeout=5))
    monkeypatch.setenv("OVIS_IMAGE_URLS", "public")
    with pytest.raises(ValueError, match="non-public address 127.0.0.1"):
        asyncio.run(media.fetch_url_bytes(origin + "/image", timeout=5))
    monkeypatch.setenv("OVIS_IMAGE_URLS", "any")
    monkeypatch.setenv("OVIS_IMAGE_URL_MAX_BYTES", "1000")
    with pytest.raises(ValueError, match="cap of 1000 bytes"):
        asyncio.run(media.fetch_url_bytes(origin + "/big", timeout=5))
    monkeypatch.delenv("OVIS_IMAGE_URL_MAX_BYTES")
    monkeypatch.setenv("OVIS_IMAGE_URL_REDIRECTS", "1")
    assert asyncio.run(media.fetch_url_bytes(f"{origin}/redirect?to={origin}/image", timeout=5)) == IMAGE


def test_failures_are_value_errors(origin):
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch(origin + "/missing")
    with pytest.raises(ValueError, match="fetching the image URL failed"):
        fetch("http://127.0.0.1:9/x.png")  # nothing listens on the discard port


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.0.1", "172.16.0.1",
                                     "192.168.0.1", "169.254.169.254", "fe80::1", "fc00::1", "0.0.0.0",
                                     "100.64.0.1", "::", "224.0.0.1"])
def test_non_public_addresses(address):
    assert not media.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address):
    assert media.is_public(ipaddress.ip_address(address))


def test_the_blocking_connector_works_inside_a_running_loop(origin, monkeypatch):
    """LLM.chat fetches with the blocking call; in a notebook an event loop is running."""
    from ovis_vllm.engine.media import OvisMediaConnector

    monkeypatch.setenv("OVIS_IMAGE_URLS", "any")

    async def inside_a_loop():
        return OvisMediaConnector().fetch_image(origin + "/image")

    assert asyncio.run(inside_a_loop()).size == (40, 30)
