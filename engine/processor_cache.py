"""Keeps vLLM's multimodal processor cache in the API server (P0) true to the engine's (P1).

With one API server vLLM 0.32 runs its "lru" IPC cache: P0 keeps only the metadata of the items
it has sent, and sends an item it has seen before without its data, trusting P1 to hold it. Two
holes let a client that did nothing wrong get HTTP 500 ("cache drift"):

1. P0 records an item while the request's prompt is processed, before the request is checked
   (prompt longer than the context, bad sampling parameters, too many logprobs, ...). A request
   refused there never reaches P1, yet P0 believes P1 has its items: the next request with the
   same image is sent without data and fails. Fix: every item hash a request's prompts produced
   is dropped from P0 when the request is refused or fails before reaching the engine. Dropping
   is always safe; the worst it costs is preprocessing that image once more.
2. The two caches also evict in different processes, so drift can still happen; vLLM then ends
   the request with an error, drops the stale hashes from P0, and leaves the retry to the client
   (a 500 on a POST, which clients do not retry). Fix: the server resends once by itself. Before
   anything of the request was returned, its prompt is processed again with every item's data
   attached (the processor-only cache, which keeps processed items, so nothing is preprocessed
   again where it still holds them) and submitted again under the same request id.

`install()` patches three of vLLM's methods, once per process, for every model the server serves:
the renderer's `process_for_engine_async` (records the hashes, and what is needed to process the
prompt again in an attribute of the engine input it returns), the serving layer's request
wrapper (drops the hashes of a refused request) and `AsyncLLM.generate` (drops them when the
request fails to enter the engine; resends on drift).
"""
from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

# The item hashes the prompts of the request being served produced: a list the serving wrapper
# creates per request, shared with the tasks it starts (they copy the context, not the list).
_REQUEST_HASHES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "ovis_request_mm_hashes", default=None)


@dataclass
class _Resend:
    """How a prompt was processed: enough to process it again with its items' data."""
    renderer: Any
    prompt: dict
    arrival_time: float
    kwargs: dict


class _ResendableInput(dict):
    """An engine input that remembers how it was made, in an attribute: its keys, which vLLM
    reads, are the renderer's own."""
    __slots__ = ("resend",)


def item_hashes(engine_input: Any) -> list[str]:
    """The multimodal item hashes of a processed prompt (both parts of an encoder-decoder one)."""
    if not isinstance(engine_input, dict):
        return []
    parts = [engine_input.get("encoder_prompt"), engine_input.get("decoder_prompt")] \
        if engine_input.get("type") == "enc_dec" else [engine_input]
    hashes: list[str] = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "multimodal":
            for per_modality in (part.get("mm_hashes") or {}).values():
                hashes.extend(h for h in per_modality if isinstance(h, str))
    return hashes


def _forget(cache, hashes: list[str]) -> None:
    if cache is not None:
        for mm_hash in hashes:
            cache.invalidate(mm_hash)


def _patch_renderer(base_renderer_cls) -> None:
    original = base_renderer_cls.process_for_engine_async

    @functools.wraps(original)
    async def process_for_engine_async(self, prompt, arrival_time, **kwargs):
        source = dict(prompt) if isinstance(prompt, dict) else None  # vLLM pops keys off it
        engine_input = await original(self, prompt, arrival_time, **kwargs)
        hashes = item_hashes(engine_input)
        if hashes:
            if (request_hashes := _REQUEST_HASHES.get()) is not None:
                request_hashes.extend(hashes)
            if source is not None:
                engine_input = _ResendableInput(engine_input)
                engine_input.resend = _Resend(self, source, arrival_time, kwargs)
        return engine_input

    base_renderer_cls.process_for_engine_async = process_for_engine_async


def _patch_serving(serving_cls) -> None:
    original = serving_cls._with_kv_transfer_rejection_cleanup

    @functools.wraps(original)
    async def _with_kv_transfer_rejection_cleanup(self, awaitable, request, raw_request):
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        request_hashes: list[str] = []
        token = _REQUEST_HASHES.set(request_hashes)
        refused = True
        try:
            result = await original(self, awaitable, request, raw_request)
            refused = isinstance(result, ErrorResponse)
            return result
        finally:
            _REQUEST_HASHES.reset(token)
            if refused and request_hashes:
                _forget(self.renderer.mm_processor_cache, request_hashes)

    serving_cls._with_kv_transfer_rejection_cleanup = _with_kv_transfer_rejection_cleanup


def _drifted(output, cache, hashes: list[str]) -> bool:
    """The engine's answer to a P0/P1 cache miss (EngineCore._handle_mm_cache_miss): the request
    ends with an error before any token, and AsyncLLM has dropped the missed hashes from P0
    before handing the output on."""
    return (cache is not None and any(o.finish_reason == "error" and not o.token_ids for o in output.outputs)
            and not all(cache.is_cached_item(h) for h in hashes))


def _patch_generate(async_llm_cls) -> None:
    original = async_llm_cls.generate

    @functools.wraps(original)
    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        resend = getattr(prompt, "resend", None)
        hashes = item_hashes(prompt)
        if not hashes:
            async for output in original(self, prompt, sampling_params, request_id, *args, **kwargs):
                yield output
            return
        cache = self.renderer.mm_processor_cache
        outputs = original(self, prompt, sampling_params, request_id, *args, **kwargs)
        returned_any = False
        try:
            async for output in outputs:
                if not returned_any and resend is not None and _drifted(output, cache, hashes):
                    break
                returned_any = True
                yield output
            else:
                return
        except Exception:
            if not returned_any:  # refused on its way into the engine: P1 has none of it
                _forget(cache, hashes)
            raise
        finally:
            await outputs.aclose()
        # Drift: vLLM has dropped the stale hashes from P0; process the prompt again with every
        # item's data attached and submit it once more, under the same id.
        logger.warning("Request %s: the engine's multimodal cache had dropped items the API "
                       "server's cache still listed (P0/P1 drift); resending them once", request_id)
        _forget(cache, hashes)
        fresh = await resend.renderer.process_for_engine_async(
            dict(resend.prompt), resend.arrival_time, **(resend.kwargs | {"skip_mm_cache": True}))
        async for output in original(self, fresh, sampling_params, request_id, *args, **kwargs):
            yield output

    async_llm_cls.generate = generate


def install() -> None:
    """Patch vLLM once in this process (vLLM calls the plugin's register() in each process)."""
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.renderers.base import BaseRenderer
    from vllm.v1.engine.async_llm import AsyncLLM

    if getattr(AsyncLLM.generate, "_ovis_patched", False):
        return
    _patch_renderer(BaseRenderer)
    _patch_serving(GenerateBaseServing)
    _patch_generate(AsyncLLM)
    AsyncLLM.generate._ovis_patched = True
