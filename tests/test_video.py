"""Video through the API for Ovis2 (frames as images with max_partition 1, as its guide runs a
video), with the official `openai` client against server.py: parity with the reference on the
frames the guide's sampling picks, and every kind of bad video answered with a 4xx while the
server goes on serving. Ovis2.5/2.6's native video: tests/test_ovis2_5.py; a video to Ovis1.6,
which has none: tests/test_server.py. The sampling rules themselves are checked here against
the guides' expressions, written out again."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SEED
from tests.helpers import assert_parity, data_url, mp4_clip, served_output
from tests.ovis_reference import ReferenceOvis

SERVER_FRAMES = 24  # the server's num_frames: the most frames a request may ask for
MAX_MODEL_LEN = 200  # a 24-frame video of the ovis2-1b preset (7 positions a frame) does not fit


@pytest.fixture(scope="module")
def ovis2_server(tmp_path_factory):
    import openai

    from ovis_vllm.engine.checkpoints import write_checkpoint
    from tests.helpers import running_server

    path = write_checkpoint(tmp_path_factory.mktemp("ovis2"), "ovis2-1b", seed=SEED)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    args = [str(path), "--dtype", "float32", "--max-num-seqs", "4", "--enforce-eager",
            "--max-model-len", str(MAX_MODEL_LEN), "--trust-request-mm-kwargs", "--image-urls", "any",
            "--media-io-kwargs", json.dumps({"video": {"num_frames": SERVER_FRAMES}})]
    with running_server(args, log) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        yield client, path


def ask_about(client, path, clip: bytes | str, media_io: dict | None = None, **extra):
    url = clip if isinstance(clip, str) else data_url(clip, "video/mp4")
    content = [{"type": "video_url", "video_url": {"url": url}},
               {"type": "text", "text": "What happens?"}]
    # Greedy without generation_config.json's repetition penalty (the reference decodes plain).
    body = {"prompt_logprobs": 1, "return_token_ids": True, "repetition_penalty": 1.0}
    if media_io is not None:
        body["media_io_kwargs"] = {"video": media_io}
    return client.chat.completions.create(model=str(path), max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": content}],
                                          extra_body=body, **extra)


def decoded_frames(clip: bytes) -> list:
    """Every frame of the clip as vLLM's video loader decodes it."""
    from PIL import Image
    from vllm.multimodal.media import ImageMediaIO, VideoMediaIO

    frames, _ = VideoMediaIO(ImageMediaIO(), num_frames=-1, video_backend="opencv").load_bytes(clip).media
    return [Image.fromarray(frame) for frame in frames]


def ovis2_guide_indices(total: int, num_frames: int) -> list[int]:
    """Ovis2's model card, as written there."""
    if total <= num_frames:
        return list(range(total))
    stride = total / num_frames
    return [min(total - 1, int((stride * i + stride * (i + 1)) / 2)) for i in range(num_frames)]


@pytest.mark.parametrize("sampling,frames", [("ovis2", 4), ("ovis2", 12), ("uniform", 4)])
def test_video_url_answers_the_reference(ovis2_server, sampling, frames):
    """A video_url (mp4 data URL) gets the reference's prompt ('\\n'.join(['<image>'] * frames)
    + '\\n' + text, each frame at max_partition 1), log-probabilities and greedy tokens, on the
    frames the chosen sampling picks from the clip's 9: the Ovis2 guide's (more frames asked
    than the clip has: all of them, as the guide) or vLLM's evenly spaced ones."""
    import numpy as np

    client, path = ovis2_server
    clip = mp4_clip(9, 96, 64, SEED % 1000)
    every = decoded_frames(clip)
    picked = ovis2_guide_indices(len(every), frames) if sampling == "ovis2" else \
        np.linspace(0, len(every) - 1, frames, dtype=int).tolist()
    reply = ask_about(client, path, clip, {"num_frames": frames, "sampling": sampling})
    images = [every[i] for i in picked]
    turns = [("user", "\n".join(["<image>"] * len(images)) + "\nWhat happens?")]
    assert_parity(served_output(reply), ReferenceOvis(path), turns, images, max_partition=1)


def test_http_video_url_is_fetched_like_an_image(ovis2_server):
    """An http(s) video URL goes through the image fetcher (its URL policy, here `any` so that a
    loopback origin may serve; size cap; HTTP 400 for a failed fetch, naming the video URL) and
    gets the same reply as the same clip in a data URL."""
    import http.server
    import threading

    import openai

    client, path = ovis2_server
    clip = mp4_clip(6, 96, 64, SEED % 1000 + 1)

    class Origin(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/clip.mp4":
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(clip)))
            self.end_headers()
            self.wfile.write(clip)

        def log_message(self, *args):
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{origin.server_address[1]}"
        fetched = ask_about(client, path, base + "/clip.mp4")
        inline = ask_about(client, path, clip)
        assert fetched.model_extra["prompt_token_ids"] == inline.model_extra["prompt_token_ids"]
        assert fetched.model_extra["prompt_logprobs"] == inline.model_extra["prompt_logprobs"]
        assert fetched.choices[0].model_extra["token_ids"] == inline.choices[0].model_extra["token_ids"]
        with pytest.raises(openai.BadRequestError, match="fetching the video URL failed: .*HTTP 404"):
            ask_about(client, path, base + "/missing.mp4")
    finally:
        origin.shutdown()


def test_sampling_rules_are_the_guides():
    """engine/video.py's rules against the guides' expressions (Ovis2's model card above;
    Ovis2.5's infer_basic_demo.py: int(i * total / num_frames))."""
    from ovis_vllm.engine.video import guide_frame_indices

    for total in range(1, 40):
        for n in range(1, 20):
            assert guide_frame_indices("ovis2", total, n) == ovis2_guide_indices(total, n)
            assert guide_frame_indices("ovis2.5", total, n) == [int(i * total / n) for i in range(n)]


def corrupt(clip: bytes) -> bytes:
    """The clip without its index (the mp4 `moov` box renamed)."""
    return clip.replace(b"moov", b"xxxx")


def unknown_codec(clip: bytes) -> bytes:
    """The clip with its codec unknown to the decoder: sample entry and object type changed."""
    at = clip.index(b"esds")
    tag = clip.index(b"\x04", at + 8) + 1  # DecoderConfigDescriptor, then its length
    while clip[tag] & 0x80:
        tag += 1
    bad = bytearray(clip)
    bad[tag + 1] = 0xC0  # objectTypeIndication: user private
    return bytes(bad).replace(b"mp4v", b"zzzz")


BAD_VIDEOS = {
    "not a video": (lambda clip: b"hello, I am text" * 8, None, "could not open video"),
    "corrupt file": (corrupt, None, "could not open video"),
    "truncated file": (lambda clip: clip[: len(clip) // 3], None, "could not open video"),
    "unknown codec": (unknown_codec, None, "could not open video"),
    "unknown sampling": (lambda clip: clip, {"sampling": "random"}, "video sampling must be one of"),
    "fps with a guide's sampling": (lambda clip: clip, {"sampling": "ovis2", "fps": 2}, "takes num_frames"),
    "more frames than the server takes": (lambda clip: mp4_clip(30, 96, 64, 5), {"num_frames": 30},
                                          f"this server takes 1 to {SERVER_FRAMES}"),
    "too long for the context": (lambda clip: mp4_clip(30, 96, 64, 6), None,
                                 f"maximum context length ({MAX_MODEL_LEN})"),
}


@pytest.mark.parametrize("name", BAD_VIDEOS)
def test_bad_video_is_a_4xx(ovis2_server, name):
    import openai

    client, path = ovis2_server
    make, media_io, message = BAD_VIDEOS[name]
    clip = mp4_clip(5, 96, 64, 1)
    with pytest.raises(openai.BadRequestError) as error:
        ask_about(client, path, make(clip), media_io)
    assert message.lower() in str(error.value).lower(), str(error.value)
    assert ask_about(client, path, clip).choices[0].model_extra["token_ids"]
