"""server.py from the outside: the official `openai` client against a live server on loopback."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.helpers import SIDE, data_url, free_port, png_bytes, png_header_only, rand_image, running_server

API_KEY = "test-key"
MODEL = "ovis-test"
IMAGE_LIMIT = 3


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [*map(image_part, urls), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    png = png_bytes(rand_image(2 * SIDE, SIDE, 7))
    (path / "allowed.png").write_bytes(png)
    (path.parent / "outside.png").write_bytes(png)
    return path


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_dir, tmp_path_factory):
    args = ["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--api-key", API_KEY,
            "--dtype", "float32", "--max-num-seqs", "32",
            "--limit-mm-per-prompt", json.dumps({"image": IMAGE_LIMIT}),
            "--allowed-local-media-path", str(media_dir), "--enforce-eager", "--seed", "0"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1", "OVIS_IMAGE_URLS": "public"}) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, messages, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


IMAGES = [png_bytes(rand_image(3 * SIDE, 3 * SIDE, 1)), png_bytes(rand_image(SIDE, SIDE, 2)),
          png_bytes(rand_image(300, 60, 3))]


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_images_equal_offline_engine(client, llm, n_images):
    messages = user("Describe the images.", *[data_url(b) for b in IMAGES[:n_images]])
    reply = chat(client, messages, logprobs=True, top_logprobs=2)
    from vllm import SamplingParams

    [offline] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert reply.choices[0].message.content == offline.outputs[0].text
    assert len(reply.choices[0].logprobs.content) == len(offline.outputs[0].token_ids)
    assert all(len(t.top_logprobs) == 2 for t in reply.choices[0].logprobs.content)


def test_multi_turn_and_streaming(client):
    messages = user("What is in the image?", data_url(IMAGES[1])) + [
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "Describe it in more detail."}]
    whole = chat(client, messages, max_tokens=12).choices[0].message.content
    stream = chat(client, messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_n_greater_than_one(client):
    # vLLM refuses n > 1 with greedy sampling; sampled with a seed, the n answers are reproducible.
    messages = user("Describe.", data_url(IMAGES[0]))
    first = chat(client, messages, n=3, temperature=1.0, seed=123, max_tokens=16)
    again = chat(client, messages, n=3, temperature=1.0, seed=123, max_tokens=16)
    assert len(first.choices) == 3 and sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert 3 <= first.usage.completion_tokens <= 3 * 16


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server + "/health").status_code == 200
    metrics = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert metrics.status_code == 200 and "vllm:" in metrics.text


def test_local_files_only_from_the_allowed_directory(client, media_dir):
    ok = chat(client, user("Describe.", (media_dir / "allowed.png").as_uri()))
    same = chat(client, user("Describe.", data_url((media_dir / "allowed.png").read_bytes())))
    assert ok.choices[0].message.content == same.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="allowed-local-media-path"):
        chat(client, user("Describe.", (media_dir.parent / "outside.png").as_uri()))


def test_api_key_required(server):
    anonymous = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(anonymous, user("Hi"))
    assert httpx.post(server + "/v1/chat/completions", json={}).status_code == 401


def test_system_message_rejected(client):
    with pytest.raises(openai.BadRequestError, match="no system role"):
        chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


# URL and local-file cases: tests/test_hostile_input.py.
BAD_REQUESTS = {
    "invalid base64": (user("Describe.", "data:image/png;base64,@@not-base64@@"), "base64"),
    "not an image": (user("Describe.", data_url(b"hello, I am text")), "decode"),
    "truncated png": (user("Describe.", data_url(IMAGES[0][:300])), "decode"),
    "zero-pixel image": (user("Describe.", data_url(png_header_only(0, 0))), "decode"),
    "decompression bomb": (user("Describe.", data_url(png_header_only(50000, 50000))), "decompression bomb"),
    "too many images": (user("Describe.", *[data_url(IMAGES[1])] * (IMAGE_LIMIT + 1)), f"At most {IMAGE_LIMIT} image"),
    "prompt over the context": ([{"role": "user", "content": "word " * 9000}], "maximum context length"),
}


def post(server, body: bytes | dict, model=MODEL):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        body = json.dumps({"model": model, "max_tokens": 4, **body}).encode()
    return httpx.post(server + "/v1/chat/completions", content=body, headers=headers, timeout=120)


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_is_a_clear_4xx(server, client, name):
    messages, needle = BAD_REQUESTS[name]
    response = post(server, {"messages": messages})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert needle.lower() in response.text.lower(), response.text
    assert chat(client, user("Describe.", data_url(IMAGES[1]))).choices[0].message.content is not None


def test_thinking_budget_without_a_thinking_mode_is_a_400(server, client):
    """Ovis1.6/2 do not think: a thinking budget is refused with the reason (vLLM alone would
    ask for a reasoning parser), and the server goes on answering."""
    response = post(server, {"messages": user("Hi"), "thinking_token_budget": 8})
    assert response.status_code == 400 and "no thinking mode" in response.text, response.text
    assert chat(client, user("Hi")).choices[0].message.content is not None


def test_video_without_a_video_mode_is_a_400(server, client):
    """Ovis1.6 takes no video (Ovis2 and Ovis2.5/2.6 do: tests/test_video.py, test_ovis2_5.py)."""
    from tests.helpers import mp4_clip

    video = {"type": "video_url", "video_url": {"url": data_url(mp4_clip(3, 64, 64, 1), "video/mp4")}}
    response = post(server, {"messages": [{"role": "user", "content": [video, {"type": "text", "text": "Hi"}]}]})
    assert response.status_code == 400 and "at most 0 video" in response.text.lower(), response.text
    assert chat(client, user("Hi")).choices[0].message.content is not None


def test_unknown_model_and_malformed_json(server):
    unknown = post(server, {"messages": user("Hi")}, model="no-such-model")
    assert unknown.status_code == 404 and "no-such-model" in unknown.text
    malformed = post(server, b'{"model": "ovis-test", "messages": [')
    assert 400 <= malformed.status_code < 500, malformed.text


def test_concurrent_requests_equal_sequential(server, client):
    cases = [user(f"Request {i}: describe.", data_url(IMAGES[i % 3])) for i in range(32)]
    sequential = [chat(client, m).choices[0].message.content for m in cases]
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def run():
        return await asyncio.gather(*[aclient.chat.completions.create(
            model=MODEL, messages=m, max_tokens=8, temperature=0) for m in cases])

    concurrent = [r.choices[0].message.content for r in asyncio.run(run())]
    assert concurrent == sequential


def test_fault_run(server, client):
    """A bounded burst of good and bad requests: every good one answered correctly, every bad one
    a 4xx, the server up at the end."""
    good = [user(f"Question {i}?", data_url(IMAGES[i % 3])) for i in range(6)]
    want = [chat(client, m).choices[0].message.content for m in good]
    bad = [messages for messages, _ in BAD_REQUESTS.values()]
    jobs = [("good", i % len(good)) if i % 2 == 0 else ("bad", i % len(bad)) for i in range(240)]
    counts = {"good_ok": 0, "good_wrong": 0, "bad_4xx": 0, "other": 0}

    async def one(kind, idx, http):
        messages = good[idx] if kind == "good" else bad[idx]
        r = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0})
        if kind == "good" and r.status_code == 200:
            ok = r.json()["choices"][0]["message"]["content"] == want[idx]
            counts["good_ok" if ok else "good_wrong"] += 1
        elif kind == "bad" and 400 <= r.status_code < 500:
            counts["bad_4xx"] += 1
        else:
            counts["other"] += 1

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server, timeout=300, limits=limits,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            await asyncio.gather(*[one(k, i, http) for k, i in jobs])

    asyncio.run(run())
    print("fault run:", counts)
    assert counts == {"good_ok": 120, "good_wrong": 0, "bad_4xx": 120, "other": 0}
    assert httpx.get(server + "/health").status_code == 200


def test_url_policy_off_and_any(monkeypatch, tmp_path):
    """The connector refuses all URL fetching when off; with `any`, a refused connection is a
    clear ValueError (the API's 400), not a crash."""
    from ovis_vllm.engine.media import OvisMediaConnector

    connector = OvisMediaConnector()
    monkeypatch.setenv("OVIS_IMAGE_URLS", "off")
    with pytest.raises(ValueError, match="disabled"):
        connector.fetch_image("https://example.com/cat.png")
    assert connector.fetch_image(data_url(IMAGES[1])).size == (SIDE, SIDE)  # data URLs still work
    monkeypatch.setenv("OVIS_IMAGE_URLS", "any")
    with pytest.raises(Exception) as info:
        connector.fetch_image(f"http://127.0.0.1:{free_port()}/x.png")
    assert "refused" in str(info.value).lower() or "connect" in str(info.value).lower()

    # With `any`, a loopback http server is fetched and decoded like the data URL.
    import functools
    import http.server
    import threading

    (tmp_path / "cat.png").write_bytes(IMAGES[2])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        fetched = connector.fetch_image(url)
        assert np.array_equal(np.asarray(fetched), np.asarray(connector.fetch_image(data_url(IMAGES[2]))))
        monkeypatch.setenv("OVIS_IMAGE_URLS", "public")
        with pytest.raises(ValueError, match="non-public address"):
            connector.fetch_image(url)
    finally:
        httpd.shutdown()


def test_images_are_decoded_as_the_reference_sees_them():
    """No EXIF transpose, no alpha compositing: the processor gets the file's own pixels."""
    from ovis_vllm.engine.media import ReferenceImageMediaIO

    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    rgba.save(buf, format="PNG", exif=exif)
    image = ReferenceImageMediaIO(image_mode=None).load_bytes(buf.getvalue()).media
    assert image.mode == "RGBA" and image.size == (30, 20)
    assert np.array_equal(np.asarray(image), np.asarray(rgba))
