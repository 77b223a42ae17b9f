"""How the server turns `image_url` parts into images: as the reference sees them, and safely.

Selected with VLLM_MEDIA_CONNECTOR=ovis (server.py sets it). Compared with vLLM's default
connector it
- decodes images without applying the EXIF orientation and without converting the mode
  (vLLM composites transparency onto white); `preprocess_image` does the reference's plain
  PIL `convert("RGB")` later;
- turns every decoding failure (bad bytes, truncated files, decompression bombs) into a
  ValueError naming the problem, which the API answers with HTTP 400;
- applies a URL policy, OVIS_IMAGE_URLS: `public` (default) fetches http(s) URLs only when the
  host resolves to public addresses (no loopback, private, link-local or reserved targets:
  no server-side request forgery), `any` fetches everything, `off` refuses all URL fetching.
  Data URLs always work; `file://` URLs only under --allowed-local-media-path (vLLM's check;
  a refused or unreadable file is the client's error, HTTP 400, not vLLM's 500).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from io import BytesIO

from PIL import Image

from vllm.multimodal.image import open_image
from vllm.multimodal.media.base import MediaWithBytes
from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.multimodal.media.image import ImageMediaIO
from urllib3.util import parse_url

URL_POLICIES = ("public", "any", "off")


def url_policy() -> str:
    policy = os.environ.get("OVIS_IMAGE_URLS", "public")
    if policy not in URL_POLICIES:
        raise ValueError(f"OVIS_IMAGE_URLS must be one of {URL_POLICIES}, not {policy!r}")
    return policy


def check_url_allowed(url: str) -> None:
    """Raise ValueError unless the policy lets the server fetch this http(s) URL."""
    # Scheme first, from a short prefix: data URLs (megabytes of base64) are neither parsed nor
    # copied here (the saving is in benchmarks/RESULTS.md, "Design measurements").
    if url[:64].split(":", 1)[0].strip().lower() not in ("http", "https"):
        return
    spec = parse_url(url)
    policy = url_policy()
    if policy == "off":
        raise ValueError("fetching image URLs is disabled on this server; send the image as a "
                         "base64 data URL")
    if policy == "any":
        return
    host = spec.hostname or ""
    try:
        infos = socket.getaddrinfo(host, spec.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve the image URL's host {host!r}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise ValueError(
                f"refusing to fetch the image URL: host {host!r} resolves to the non-public "
                f"address {address} (the server's URL policy is 'public')")


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


@MEDIA_CONNECTOR_REGISTRY.register("ovis")
class OvisMediaConnector(MediaConnector):
    def _image_io(self) -> ReferenceImageMediaIO:
        return ReferenceImageMediaIO(**{"image_mode": None} | self.media_io_kwargs.get("image", {}))

    def _load_file_url(self, url_spec, media_io):
        # vLLM raises RuntimeError here (HTTP 500, and the client's keep-alive connection is
        # dropped); these are the client's errors, so ValueError (HTTP 400) naming the problem.
        if self.allowed_local_media_path is None:
            raise ValueError("this server does not load local files (file:// URLs); send the "
                             "image as a data URL, or start the server with "
                             "--allowed-local-media-path DIR")
        try:
            return super()._load_file_url(url_spec, media_io)
        except OSError as exc:  # missing or unreadable file under the allowed directory
            raise ValueError(f"cannot read the local image file: {exc.strerror or exc}") from exc

    def load_from_url(self, url, media_io, *, fetch_timeout=None):
        check_url_allowed(url)
        return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)

    async def load_from_url_async(self, url, media_io, *, fetch_timeout=None):
        check_url_allowed(url)
        return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)

    def fetch_image(self, image_url: str, *, image_mode: str | None = "RGB") -> Image.Image:
        from vllm import envs

        return self.load_from_url(image_url, self._image_io(), fetch_timeout=envs.VLLM_IMAGE_FETCH_TIMEOUT)

    async def fetch_image_async(self, image_url: str, *, image_mode: str | None = "RGB") -> Image.Image:
        from vllm import envs

        return await self.load_from_url_async(image_url, self._image_io(),
                                              fetch_timeout=envs.VLLM_IMAGE_FETCH_TIMEOUT)
