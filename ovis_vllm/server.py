"""OpenAI-compatible Ovis server: `vllm serve`, with our plugin and Ovis defaults.

    python server.py [any `vllm serve` flag ...]     # from a checkout (server.py runs this module)
    ovis-serve [any `vllm serve` flag ...]           # installed
    python -m ovis_vllm.server [...]

It runs vLLM's serve command (so --api-server-count N starts N API-server processes, and the
data-parallel modes work as with `vllm serve`). Every vLLM flag goes to vLLM unchanged; our
defaults fill in only what was not given:
- no `--model`: the embedded default checkpoint (an Ovis1.6-Gemma2-shaped `tiny` model with
  random weights, generated on first use and cached under ~/.cache/ovis-vllm);
- `--chat-template`: the reference's conversation format of the checkpoint's member
  (engine/members.py): Gemma (no system role), Llama 3 or Qwen (the reference's default system
  prompt when a request has none); Ovis2.5/2.6 keep the checkpoint's own template, which is
  the reference's;
- `--max-model-len`: the checkpoint's `multimodal_max_length` when the LLM allows more (the
  reference never sees longer sequences); logged (Ovis1.6/2: Ovis2.5's code never reads one);
- a checkpoint vLLM's CPU backend cannot run on this CPU (GPTQ without AVX-512) is refused at
  start with the reason (engine/cpu_support.py), where vLLM alone fails at the first request;
  bf16 on a CPU without AVX-512 is served, with a warning that --dtype float32 is ~200x faster;
- Ovis2.5/2.6 think: `--reasoning-parser qwen3`, so the thinking arrives in `reasoning_content`,
  and the reference's thinking budget for `thinking_token_budget` (engine/thinking.py, a logits
  processor added to --logits-processors); Ovis1.6/2 answer a budget with HTTP 400;
- `--limit-mm-per-prompt {"image": 8}` on the Ovis1.6/2 checkpoints this plugin implements (and
  one video on Ovis2, which runs it as its frames, as its guide); Ovis2.5/
  2.6 and any other checkpoint keep vLLM's own limits (Ovis2.5: any number of images or one
  video, as the reference), so serving them here is never more restrictive;
- on a machine without CUDA: `--gpu-memory-utilization 0.5` and VLLM_CPU_KVCACHE_SPACE=4 (GiB);
- images from `image_url` parts are decoded as the reference sees them and fetched under a URL
  policy (engine/media.py);
- request bodies over --max-request-bytes get HTTP 413, and bodies being processed at once are
  bounded by --max-pending-bytes (the RequestBodyLimit middleware).
The stop tokens come from the checkpoint's generation_config.json (Gemma: `<eos>`,
`<end_of_turn>`; Llama 3: `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`; Qwen: `<|im_end|>`,
`<|endoftext|>`).

Our own flags (taken out before vLLM sees the rest):
  --image-urls {public,any,off}   which http(s) image URLs the server fetches (default public:
                                  only hosts that resolve to public addresses)
  --image-url-max-bytes N         the most bytes read from one image URL (default 32 MiB)
  --image-url-redirects N         redirects followed per image URL, each hop checked as the
                                  first (default 0: none)
  --max-request-bytes N           the largest request body (default 64 MiB); larger: HTTP 413
  --max-pending-bytes N           request bodies admitted and not yet answered, per API-server
                                  process (default 128 MiB); more wait in line
  --pending-timeout S             how long a request waits in that line before HTTP 503 with
                                  Retry-After (default 60)
  --system-prompt {reject,merge}  formats without a system role (Gemma): a system message gets
                                  HTTP 400 (default, as the reference) or is merged into the
                                  first user message
"""

from __future__ import annotations

import json
import logging
import os
import sys

logger = logging.getLogger("ovis.server")

DEFAULT_IMAGE_LIMIT = 8
DEFAULT_SERVED_NAME = "ovis-default"
# Eight images as base64 data URLs of a few MiB each fit; vLLM itself reads any body whole.
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
# Bodies being decoded and preprocessed at once, per API-server process (RESULTS.md, "Realistic
# images": what a burst costs with and without this bound).
DEFAULT_MAX_PENDING_BYTES = 128 << 20
DEFAULT_PENDING_TIMEOUT = 60


class RequestBodyLimit:
    """ASGI middleware bounding what request bodies cost the API server.

    - A body over OVIS_MAX_REQUEST_BYTES gets HTTP 413, with no more than that held in memory.
      The rest is read to its end and dropped, so that the client, still sending, gets the
      answer and not a reset connection.
    - A body with the reference's `thinking_budget` gets it renamed to vLLM's
      `thinking_token_budget` (Ovis2.5/2.6's thinking budget, engine/thinking.py).
    - Bodies admitted but not yet answered (the window in which their images are decoded and
      preprocessed, several times the body's size in memory) total at most
      OVIS_MAX_PENDING_BYTES; one request is always admitted. A request over the budget waits
      in line; after OVIS_PENDING_TIMEOUT seconds it gets HTTP 503 with Retry-After. Its bytes
      are released when its response starts (for a stream: once the prompt is processed).
    """

    def __init__(self, app) -> None:
        self.app = app
        self.max_bytes = int(os.environ.get("OVIS_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES))
        self.max_pending = int(os.environ.get("OVIS_MAX_PENDING_BYTES", DEFAULT_MAX_PENDING_BYTES))
        self.timeout = float(os.environ.get("OVIS_PENDING_TIMEOUT", DEFAULT_PENDING_TIMEOUT))
        self.pending = 0
        self.released = None  # asyncio.Condition, made in the server's event loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                messages.append(message)
            if not message.get("more_body"):
                break
        if size > self.max_bytes:
            return await self._error(send, 413, "RequestEntityTooLarge",
                                     f"request body of {size} bytes is over this server's limit of "
                                     f"{self.max_bytes} bytes (--max-request-bytes)")
        if not await self._admit(size):
            return await self._error(
                send, 503, "ServiceUnavailable",
                f"server busy: requests of {self.pending} bytes are still being processed and this "
                f"one ({size} bytes) waited {self.timeout:g} s for room (--max-pending-bytes "
                f"{self.max_pending}); retry later", retry_after=max(1, round(self.timeout)))
        held = size  # released when the response starts, or when this request ends

        async def send_and_release(message):
            nonlocal held
            if message["type"] == "http.response.start" and held:
                await self._release(held)
                held = 0
            await send(message)

        try:
            messages, scope, error = _thinking_budget_renamed(messages, scope)
            if error:
                return await self._error(send_and_release, 400, "BadRequestError", error)
            buffered = iter(messages)

            async def replay():
                return next(buffered, None) or await receive()

            await self.app(scope, replay, send_and_release)
        finally:
            if held:
                await self._release(held)

    async def _admit(self, size: int) -> bool:
        """Wait until `size` more pending bytes fit the budget (or nothing is pending); False
        after the timeout."""
        import asyncio

        if self.released is None:
            self.released = asyncio.Condition()
        fits = lambda: self.pending == 0 or self.pending + size <= self.max_pending  # noqa: E731
        async with self.released:
            try:
                await asyncio.wait_for(self.released.wait_for(fits), self.timeout)
            except asyncio.TimeoutError:
                return False
            self.pending += size
            return True

    async def _release(self, size: int) -> None:
        async with self.released:
            self.pending -= size
            self.released.notify_all()

    async def _error(self, send, status: int, kind: str, message: str, retry_after: int | None = None) -> None:
        body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                     "code": status}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _thinking_budget_renamed(messages: list[dict], scope: dict) -> tuple[list[dict], dict, str | None]:
    """A request body with the reference's `thinking_budget` gets it as vLLM's
    `thinking_token_budget` (which vLLM's request model knows; it would drop the other name with
    only a log line): (the body's messages, the scope with their length, an error for HTTP 400)."""
    body = b"".join(m.get("body", b"") for m in messages)  # of one chunk: that chunk, no copy
    if b'"thinking_budget"' not in body:
        return messages, scope, None
    try:
        request = json.loads(body)
    except ValueError:
        return messages, scope, None  # vLLM answers malformed JSON itself
    if not isinstance(request, dict) or "thinking_budget" not in request:
        return messages, scope, None
    if "thinking_token_budget" in request:
        return messages, scope, "give thinking_budget or thinking_token_budget, not both"
    request["thinking_token_budget"] = request.pop("thinking_budget")
    body = json.dumps(request).encode()
    length = str(len(body)).encode()
    headers = [(k, length if k == b"content-length" else v) for k, v in scope["headers"]]
    return [{"type": "http.request", "body": body, "more_body": False}], dict(scope, headers=headers), None


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _value(argv: list[str], flag: str) -> str | None:
    """The value of `flag VALUE` / `flag=VALUE` in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_checkpoint_config(argv: list[str]):
    """The served checkpoint's config as vLLM will read it (local directory, Hugging Face hub or
    ModelScope with VLLM_USE_MODELSCOPE=True; `--hf-overrides` applied), or None if it cannot be
    read here (vLLM then reports the problem itself)."""
    from vllm.transformers_utils.config import get_config

    overrides = json.loads(_value(argv, "--hf-overrides") or "{}")
    try:
        return get_config(_value(argv, "--model"), trust_remote_code=_given(argv, "--trust-remote-code"),
                          revision=_value(argv, "--revision"), hf_overrides_kw=overrides)
    except Exception as exc:  # noqa: BLE001  no defaults from the checkpoint; vLLM will say why
        logger.warning("could not read the checkpoint's config for Ovis defaults: %s", exc)
        return None


def slow_bf16_warning(argv: list[str], config) -> str | None:
    """A warning where the model will run in bf16 on a CPU whose oneDNN has no bf16 matmul (x86
    without AVX-512): vLLM's layers and ours then fall back to torch's bf16 GEMM, about 200x
    slower than fp32 there (benchmarks/RESULTS.md). vLLM resolves `--dtype auto` to bf16 on CPU
    for bf16 and fp32 checkpoints alike. The dtype stays the user's (fp32 doubles the weights'
    memory); the warning says what to pass."""
    import torch

    from ovis_vllm.kernels.cpu import onednn_unavailable

    if _has_cuda():
        return None
    dtype = _value(argv, "--dtype") or "auto"
    checkpoint_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    in_bf16 = dtype == "bfloat16" or (dtype == "auto" and checkpoint_dtype in (torch.bfloat16, torch.float32, None))
    why = onednn_unavailable(torch.bfloat16)
    if not in_bf16 or why is None:
        return None
    return (f"serving in bf16 on a CPU where {why}: vLLM's Linear layers and the Ovis visual "
            f"embedding run torch's bf16 GEMM, about 200x slower than fp32 on such a CPU. Pass "
            f"--dtype float32 to serve at speed (the weights take twice the memory)")


def _checkpoint_defaults(argv: list[str], system_prompt: str) -> tuple[list[str], object]:
    """Chat template and max model length from the served checkpoint's member row; returns the
    argv and the member (None for a checkpoint this plugin does not implement)."""
    from ovis_vllm.engine.configs import register_configs
    from ovis_vllm.engine.cpu_support import cpu_cannot_serve
    from ovis_vllm.engine.members import OVIS2_5_ARCHITECTURES, OVIS_ARCHITECTURES, member_of

    register_configs()  # Ovis2.5/2.6 configs without remote code, as in vLLM's processes
    config = load_checkpoint_config(argv)
    if config is not None and (reason := cpu_cannot_serve(config)):
        raise SystemExit(reason)
    if config is not None and (warning := slow_bf16_warning(argv, config)):
        logger.warning(warning)
    ours = set(OVIS_ARCHITECTURES + OVIS2_5_ARCHITECTURES)
    member = member_of(config) if config is not None and \
        ours & set(getattr(config, "architectures", None) or []) else None
    if member is None:
        if system_prompt == "merge":
            raise SystemExit("--system-prompt merge applies to Ovis1.6-Gemma2 checkpoints only")
        return argv, None
    conversation = member.conversation
    if system_prompt == "merge" and conversation.system_merge_template is None:
        raise SystemExit(f"--system-prompt merge is for conversation formats without a system "
                         f"role; {member.name} has one")
    template = conversation.system_merge_template if system_prompt == "merge" \
        else conversation.chat_template
    if template is not None and not _given(argv, "--chat-template"):
        argv += ["--chat-template", template]
    llm_max = getattr(config.get_text_config(), "max_position_embeddings", None)
    mm_max = getattr(config, "multimodal_max_length", None)
    if mm_max is None:  # Ovis2.5/2.6: no cap in the reference's code
        return argv, member
    given = _value(argv, "--max-model-len")
    if given is not None and given.isdigit() and int(given) > mm_max:
        raise SystemExit(f"--max-model-len {given} exceeds this checkpoint's multimodal_max_length "
                         f"{mm_max}: the reference model never sees longer sequences")
    if given is None and llm_max is not None and llm_max > mm_max:
        logger.info("serving with --max-model-len %d, the checkpoint's multimodal_max_length "
                    "(the LLM allows %d; the reference never sees longer sequences)", mm_max, llm_max)
        argv += ["--max-model-len", str(mm_max)]
    return argv, member


def _thinking_defaults(argv: list[str], member) -> list[str]:
    """Ovis2.5/2.6 think: vLLM's qwen3 reasoning parser (the checkpoint's `<think>` ... `</think>`
    format) puts the thinking into `reasoning_content`, and the reference's thinking budget
    (engine/thinking.py) serves `thinking_token_budget`. Members without thinking get a 400 for a
    budget that names the reason. vLLM's V1 model runner refuses custom logits processors with
    speculative decoding: there the budget is left to vLLM (a warning says so)."""
    if member.thinks and not _given(argv, "--reasoning-parser"):
        argv += ["--reasoning-parser", "qwen3"]
    if _value(argv, "--runner") == "pooling":  # vLLM refuses logits processors there
        return argv
    if _given(argv, "--speculative-config"):
        if member.thinks:
            logger.warning("speculative decoding: thinking_token_budget is vLLM's (--reasoning-config), "
                           "not the reference's two-phase budget (custom logits processors cannot run)")
        return argv
    processor = "ovis_vllm.engine.thinking:" + ("ThinkingBudget" if member.thinks else "NoThinking")
    for i, arg in enumerate(argv):  # the user's processors stay; ours joins them
        if arg == "--logits-processors":
            return argv[:i + 1] + [processor] + argv[i + 1:]
        if arg.startswith("--logits-processors="):
            return argv[:i] + ["--logits-processors", processor, arg.split("=", 1)[1]] + argv[i + 1:]
    return argv + ["--logits-processors", processor]


def _take_option(argv: list[str], flag: str, default: str) -> str:
    """Remove `flag VALUE` / `flag=VALUE` from argv and return VALUE."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
        if arg == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
    return default


def _take_choice(argv: list[str], flag: str, choices: tuple[str, ...], default: str) -> str:
    value = _take_option(argv, flag, default)
    if value not in choices:
        raise SystemExit(f"{flag} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _take_count(argv: list[str], flag: str, env: str, default: int) -> None:
    """Move `flag N` (an int >= 0) from argv into the environment variable `env`, which every
    process vLLM starts inherits; an existing `env` is the default."""
    value = _take_option(argv, flag, os.environ.get(env, str(default)))
    if not value.isdigit():
        raise SystemExit(f"{flag} must be an integer >= 0, not {value!r}")
    os.environ[env] = value


def build_argv(argv: list[str]) -> list[str]:
    """vLLM's argv: the user's flags plus our defaults for those not given."""
    from ovis_vllm.engine import video  # noqa: F401  the "ovis" video loader, also with VLLM_PLUGINS=none
    from ovis_vllm.engine.media import DEFAULT_MAX_IMAGE_URL_BYTES, URL_POLICIES

    argv = list(argv)
    os.environ["OVIS_IMAGE_URLS"] = _take_choice(argv, "--image-urls", URL_POLICIES,
                                                 os.environ.get("OVIS_IMAGE_URLS", "public"))
    _take_count(argv, "--image-url-max-bytes", "OVIS_IMAGE_URL_MAX_BYTES", DEFAULT_MAX_IMAGE_URL_BYTES)
    _take_count(argv, "--image-url-redirects", "OVIS_IMAGE_URL_REDIRECTS", 0)
    _take_count(argv, "--max-request-bytes", "OVIS_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)
    _take_count(argv, "--max-pending-bytes", "OVIS_MAX_PENDING_BYTES", DEFAULT_MAX_PENDING_BYTES)
    _take_count(argv, "--pending-timeout", "OVIS_PENDING_TIMEOUT", DEFAULT_PENDING_TIMEOUT)
    system_prompt = _take_choice(argv, "--system-prompt", ("reject", "merge"), "reject")
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", "ovis")
    argv += ["--middleware", "ovis_vllm.server.RequestBodyLimit"]  # in every API-server process
    if argv and not argv[0].startswith("-"):  # `server.py MODEL ...`, like `vllm serve MODEL`
        argv = ["--model", argv[0]] + argv[1:]
    if not _given(argv, "--model"):
        from ovis_vllm.engine.checkpoints import default_model_dir

        path = default_model_dir()
        logger.warning("no --model given: serving the embedded default checkpoint %s "
                       "(Ovis1.6-Gemma2-shaped, tiny preset, random weights) as %r",
                       path, DEFAULT_SERVED_NAME)
        argv = ["--model", str(path)] + argv
        if not _given(argv, "--served-model-name"):
            argv += ["--served-model-name", DEFAULT_SERVED_NAME]
    argv, member = _checkpoint_defaults(argv, system_prompt)
    if member is not None and "Ovis" in member.architectures and not _given(argv, "--limit-mm-per-prompt"):
        limits = {"image": DEFAULT_IMAGE_LIMIT} | ({"video": 1} if member.video_pad_token else {})
        argv += ["--limit-mm-per-prompt", json.dumps(limits)]
    if member is not None:
        argv = _thinking_defaults(argv, member)
    if not _has_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        if not _given(argv, "--gpu-memory-utilization"):
            argv += ["--gpu-memory-utilization", "0.5"]
    return argv


def run_vllm_serve(args: list[str]) -> None:
    """`vllm serve ARGS`: vLLM's serve command with its multi-process front end
    (--api-server-count) and data-parallel modes. The `vllm` console script and
    vllm.entrypoints.cli.main need the distribution named `vllm`, which vllm-cpu is not, so the
    serve subcommand is set up here as that main does."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="server.py")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    parsed = parser.parse_args([serve.name, *args])
    configure_logging_from_args(parsed)
    serve.validate(parsed)
    serve.cmd(parsed)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_argv(sys.argv[1:] if argv is None else argv)
    logger.info("starting vLLM's OpenAI-compatible server (vllm serve) with: %s", " ".join(args))
    run_vllm_serve(args)


if __name__ == "__main__":
    main()
