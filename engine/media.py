"""How the server turns `image_url` parts into images: as the reference sees them, and safely.
(`video_url` parts are fetched and refused the same way; their decoding is engine/video.py's.)

Selected with VLLM_MEDIA_CONNECTOR=ovis (server.py sets it). Compared with vLLM's default
connector it
- decodes images without applying the EXIF orientation and without converting the mode
  (vLLM composites transparency onto white); `preprocess_image` does the reference's plain
  PIL `convert("RGB")` later;
- turns every failure a client can cause (bad bytes, truncated files, decompression bombs,
  unsupported URL schemes, refused or failed fetches) into a ValueError naming the problem,
  which the API answers with HTTP 400;
- fetches http(s) URLs itself, under a URL policy, OVIS_IMAGE_URLS: `public` (default) only
  from hosts whose every address is public (no loopback, private, link-local or reserved
  targets: no server-side request forgery), `any` from everywhere, `off` never. The host is
  resolved in a thread with the fetch's timeout, and the connection goes only to the addresses
  that were checked (no DNS-rebinding window); at most OVIS_IMAGE_URL_MAX_BYTES are read;
  redirects are followed only up to OVIS_IMAGE_URL_REDIRECTS hops (default 0), each hop checked
  like the first.
  Data URLs always work; `file://` URLs only under --allowed-local-media-path (vLLM's check;
  a refused or unreadable file is the client's error, HTTP 400, not vLLM's 500).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import aiohttp
import aiohttp.abc
import yarl
from PIL import Image

from vllm.multimodal.image import open_image
from vllm.multimodal.media.base import MediaWithBytes
from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector, global_thread_pool
from vllm.multimodal.media.image import ImageMediaIO

URL_POLICIES = ("public", "any", "off")
DEFAULT_MAX_IMAGE_URL_BYTES = 32 << 20
HTTP_SCHEMES = ("http", "https")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK_BYTES = 64 << 10

AddressCheck = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]

# Name lookups block a thread each; their own pool, so slow resolvers never take the threads
# that decode images or that the event loop's default executor serves.
_resolver_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ovis-resolve")


def url_policy() -> str:
    policy = os.environ.get("OVIS_IMAGE_URLS", "public")
    if policy not in URL_POLICIES:
        raise ValueError(f"OVIS_IMAGE_URLS must be one of {URL_POLICIES}, not {policy!r}")
    return policy


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return value


def max_image_url_bytes() -> int:
    return _env_int("OVIS_IMAGE_URL_MAX_BYTES", DEFAULT_MAX_IMAGE_URL_BYTES)


def max_redirects() -> int:
    return _env_int("OVIS_IMAGE_URL_REDIRECTS", 0)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # ::ffff:a.b.c.d reaches a.b.c.d; older Pythons judge the IPv6 form alone.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def policy_check(what: str = "image") -> AddressCheck:
    """The address predicate of the server's URL policy; ValueError when fetching is off."""
    policy = url_policy()
    if policy == "off":
        raise ValueError(f"fetching {what} URLs is disabled on this server; send the {what} as a "
                         "base64 data URL")
    return is_public if policy == "public" else (lambda address: True)


def url_scheme(url: str) -> str:
    # From a short prefix: data URLs (megabytes of base64) are neither parsed nor copied here
    # (the saving is in benchmarks/RESULTS.md, "Design measurements").
    head = url[:64]
    return head.split(":", 1)[0].strip().lower() if ":" in head else ""


def lookup(host: str, port: int) -> list[str]:
    """The host's addresses (blocking: runs in _resolver_pool; tests replace it)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


async def resolve_checked(host: str, port: int, allowed: AddressCheck, what: str = "image") -> list[str]:
    """The host's addresses, each one allowed by the policy, or ValueError naming the problem."""
    loop = asyncio.get_running_loop()
    try:
        addresses = await loop.run_in_executor(_resolver_pool, lookup, host, port)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise ValueError(f"cannot resolve the {what} URL's host {host!r}: {exc}") from exc
    for address in addresses:
        if not allowed(ipaddress.ip_address(address.split("%")[0])):
            raise ValueError(f"refusing to fetch the {what} URL: host {host!r} resolves to the "
                             f"non-public address {address} (the server's URL policy is "
                             f"'{url_policy()}')")
    return addresses


class PinnedResolver(aiohttp.abc.AbstractResolver):
    """Answers every lookup with the addresses already checked, so the connection cannot go
    anywhere else (a second DNS answer could name a private host). TLS still verifies the
    certificate against the URL's host name, and the Host header is the URL's."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        return [{"hostname": host, "host": address, "port": port, "proto": 0,
                 "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET}
                for address in self.addresses]

    async def close(self) -> None:
        pass


def _parse_url(url: str, what: str) -> yarl.URL:
    try:
        return yarl.URL(url)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid {what} URL {url[:100]!r}: {exc}") from exc


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    too_big = f"above this server's cap of {max_bytes} bytes for media URLs"
    if response.content_length is not None and response.content_length > max_bytes:
        raise ValueError(f"the {what} at the URL is {response.content_length} bytes, {too_big}")
    data = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise ValueError(f"the {what} at the URL is more than {max_bytes} bytes, {too_big}")
    return bytes(data)


async def fetch_url_bytes(url: str, *, timeout: float, allowed: AddressCheck | None = None,
                          max_bytes: int | None = None, redirects: int | None = None,
                          check_url: Callable[[str], None] | None = None, what: str = "image") -> bytes:
    """The body at an http(s) URL, fetched under the server's policy (or the `allowed` address
    predicate), within `timeout` seconds for everything (lookups included), at most `max_bytes`
    long, following at most `redirects` redirects, each hop checked as the first (`check_url`
    too). Every failure is a ValueError naming the problem, and `what` the URL holds ("image",
    "video")."""
    allowed = policy_check(what) if allowed is None else allowed
    max_bytes = max_image_url_bytes() if max_bytes is None else max_bytes
    redirects = max_redirects() if redirects is None else redirects

    async def fetch() -> bytes:
        current = _parse_url(url, what)
        for hop in range(redirects + 1):
            if current.scheme not in HTTP_SCHEMES or not current.raw_host:
                raise ValueError(f"cannot fetch the {what} URL {str(current)[:100]!r}: not an "
                                 "http(s) URL with a host")
            if check_url is not None:
                check_url(str(current))
            addresses = await resolve_checked(current.raw_host, current.port, allowed, what)
            connector = aiohttp.TCPConnector(resolver=PinnedResolver(addresses), use_dns_cache=False)
            # trust_env=False: a proxy from the environment would make the checks meaningless.
            async with aiohttp.ClientSession(connector=connector, trust_env=False) as session, \
                    session.get(current, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                    target = current.join(_parse_url(response.headers["Location"], what))
                    if hop == redirects:
                        raise ValueError(
                            f"the {what} URL redirects (HTTP {response.status} to "
                            f"{str(target)[:100]!r}) and this server follows at most "
                            f"{redirects} redirect(s); send the final URL")
                    current = target
                    continue
                if response.status >= 400:
                    raise ValueError(f"fetching the {what} URL failed: its server answered HTTP "
                                     f"{response.status} {response.reason or ''}".rstrip())
                return await _read_capped(response, max_bytes, what)
        raise AssertionError("unreachable")

    try:
        return await asyncio.wait_for(fetch(), timeout)
    except asyncio.TimeoutError as exc:
        raise ValueError(f"fetching the {what} URL took longer than {timeout} s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ValueError(f"fetching the {what} URL failed: {exc}") from exc


class ReferenceImageMediaIO(ImageMediaIO):
    """Decode only: no EXIF transpose, no mode conversion."""

    def load_bytes(self, data: bytes) -> MediaWithBytes[Image.Image]:
        try:
            image = open_image(BytesIO(data))
            image.load()
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image refused as a possible decompression bomb: {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
            raise ValueError(f"could not decode the image: {exc}") from exc
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size ({image.width}x{image.height})")
        return MediaWithBytes(image, data, None)


def media_kind(media_io) -> str:
    """What a URL loaded with `media_io` holds, to name it in error messages: "image",
    "video", "audio" (from vLLM's MediaIO class names), or "media"."""
    name = type(media_io).__name__.lower()
    return next((kind for kind in ("image", "video", "audio") if kind in name), "media")


@MEDIA_CONNECTOR_REGISTRY.register("ovis")
class OvisMediaConnector(MediaConnector):
    def _image_io(self) -> ReferenceImageMediaIO:
        return ReferenceImageMediaIO(**{"image_mode": None} | self.media_io_kwargs.get("image", {}))

    def _load_data_url(self, url, media_io):
        try:
            return super()._load_data_url(url, media_io)
        except NotImplementedError as exc:  # vLLM's 501 for a client's non-base64 data URL
            raise ValueError(f"{exc} Send data:<mime type>;base64,<data>.") from exc

    def _load_file_url(self, url_spec, media_io):
        # vLLM raises RuntimeError here (HTTP 500, and the client's keep-alive connection is
        # dropped); these are the client's errors, so ValueError (HTTP 400) naming the problem.
        what = media_kind(media_io)
        if self.allowed_local_media_path is None:
            raise ValueError(f"this server does not load local files (file:// URLs); send the "
                             f"{what} as a data URL, or start the server with "
                             f"--allowed-local-media-path DIR")
        try:
            return super()._load_file_url(url_spec, media_io)
        except OSError as exc:  # missing or unreadable file under the allowed directory
            raise ValueError(f"cannot read the local {what} file: {exc.strerror or exc}") from exc

    async def _fetch(self, url: str, fetch_timeout: float | None, what: str) -> bytes:
        from vllm import envs

        return await fetch_url_bytes(url, timeout=fetch_timeout or envs.VLLM_IMAGE_FETCH_TIMEOUT,
                                     check_url=self._check_allowed_domain, what=what)

    def _check_allowed_domain(self, url: str) -> None:
        from urllib3.util import parse_url

        self._assert_url_in_allowed_media_domains(parse_url(url))  # vLLM's --allowed-media-domains

    @staticmethod
    def _check_scheme(url: str, what: str) -> str:
        scheme = url_scheme(url)
        if scheme not in ("data", "file", *HTTP_SCHEMES):
            raise ValueError(f"unsupported {what} URL {url[:40]!r}: send a data:, http(s): or "
                             "file: URL")
        return scheme

    def load_from_url(self, url, media_io, *, fetch_timeout=None):
        what = media_kind(media_io)
        if self._check_scheme(url, what) in HTTP_SCHEMES:
            # A thread of its own for the event loop: the caller's may run one (a notebook).
            with ThreadPoolExecutor(1) as pool:
                data = pool.submit(asyncio.run, self._fetch(url, fetch_timeout, what)).result()
            return media_io.load_bytes(data)
        return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)

    async def load_from_url_async(self, url, media_io, *, fetch_timeout=None):
        what = media_kind(media_io)
        if self._check_scheme(url, what) in HTTP_SCHEMES:
            data = await self._fetch(url, fetch_timeout, what)
            return await asyncio.get_running_loop().run_in_executor(
                global_thread_pool, media_io.load_bytes, data)
        return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)

    def fetch_image(self, image_url: str, *, image_mode: str | None = "RGB") -> Image.Image:
        return self.load_from_url(image_url, self._image_io())

    async def fetch_image_async(self, image_url: str, *, image_mode: str | None = "RGB") -> Image.Image:
        return await self.load_from_url_async(image_url, self._image_io())
