"""LoRA adapters on Ovis: served on the LLM's linear layers, refused where they would not apply.

Our Ovis declares vLLM's LoRA support (engine/model.py): vLLM wraps the LLM's linear layers
(q/k/v/o and gate/up/down projections) and serves many adapters at a time beside the base model.
vLLM applies LoRA to a multimodal model's language model only. `install()` patches vLLM once
per process where it falls short:

- An adapter that also adapts the visual tokenizer (ms-swift's `--freeze_vit false`, or the
  aligner) is refused when it is loaded, naming those modules. vLLM would load it and silently
  serve only its LLM part: answers of a model that was never trained.
- An adapter made for another base model is refused naming the first layer whose input width
  differs (vLLM fails later on a tensor size, naming no module).
- On CPU, a token with no adapter in a batch that also holds adapted tokens gets no LoRA term.
  vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops) index the stacked adapter weights with the
  token's slot, and -1 ("no adapter") picks the last slot: base-model requests batched with
  requests through adapters are answered with another adapter's weights (measured: prompt
  log-probabilities off by ~2 from the base model's). The CUDA (Triton) kernels skip -1.
  (Known upstream: vllm-project/vllm pull requests 48421 and 49656, open.)
- An adapter that the engine cannot load (made for another base model, a rank over
  --max-lora-rank, no weights file, modules the model does not have) is answered by
  `/v1/load_lora_adapter` with HTTP 400 and the reason, where vLLM answers 500, a server fault;
  the engine is untouched and keeps serving everyone else either way.
"""

from __future__ import annotations

import functools
import os
import re
from http import HTTPStatus

# vLLM's message for any exception in the engine's add_lora, from a worker process or not.
_ADD_LORA_FAILED = re.compile(r"Call to add_lora method failed: (?:Worker failed with error '(.*)', "
                              r"please check the stack trace above for the root cause|(.*))", re.DOTALL)


def check_modules(model, module_names) -> None:
    """Raise ValueError if an adapter adapts modules of `model` that LoRA is not applied to
    (outside its language model), naming them."""
    check = getattr(model, "check_lora_modules", None)
    if check is not None:
        check(module_names)


def check_input_widths(model, lora) -> None:
    """Raise ValueError naming the first adapted module whose lora_A does not take the width
    of that layer's input here: an adapter made for another base model (vLLM would fail on a
    tensor size with no module named)."""
    packed = {leaf: fused for fused, leaves in getattr(model, "packed_modules_mapping", {}).items()
              for leaf in leaves}
    for name, weights in sorted(lora.loras.items()):
        parent, _, leaf = name.rpartition(".")
        try:
            layer = model.get_submodule(f"{parent}.{packed.get(leaf, leaf)}" if parent else leaf)
        except AttributeError:
            continue  # vLLM reports modules the model does not have
        width = getattr(getattr(layer, "base_layer", layer), "input_size", None)
        if weights.lora_a is not None and width is not None and weights.lora_a.shape[-1] != width:
            raise ValueError(f"{name}: the adapter's lora_A takes inputs of width "
                             f"{weights.lora_a.shape[-1]}, this model's layer {width}; was the "
                             f"adapter trained on another base model?")


def adapter_module_names(adapter_dir: str) -> list[str] | None:
    """The module names in a PEFT adapter's safetensors file, read without loading the tensors
    (None where it has none: vLLM then reports the missing file)."""
    from safetensors import safe_open

    from vllm.lora.utils import parse_fine_tuned_lora_name

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        return sorted({parse_fine_tuned_lora_name(key)[0] for key in f.keys()})


def _patch_worker_load(worker_manager_cls) -> None:
    original = worker_manager_cls._load_adapter

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        from vllm.lora.utils import get_adapter_absolute_path

        model = self._adapter_manager.model
        names = adapter_module_names(get_adapter_absolute_path(lora_request.lora_path))
        if names is not None:  # before vLLM's own checks, so that every such module is named
            check_modules(model, names)
        lora = original(self, lora_request)
        if names is None:  # a .bin / .pt adapter: its modules are known once loaded
            check_modules(model, lora.loras)
        check_input_widths(model, lora)
        return lora

    worker_manager_cls._load_adapter = _load_adapter


def _patch_load_endpoint(serving_models_cls) -> None:
    original = serving_models_cls.load_lora_adapter

    @functools.wraps(original)
    async def load_lora_adapter(self, request, *args, **kwargs):
        from vllm.entrypoints.serve import create_error_response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        response = await original(self, request, *args, **kwargs)
        if isinstance(response, ErrorResponse) and response.error.code == HTTPStatus.INTERNAL_SERVER_ERROR \
                and (failed := _ADD_LORA_FAILED.fullmatch(response.error.message)):
            return create_error_response(
                f"LoRA adapter {request.lora_name!r} cannot be served with this model: "
                f"{failed.group(1) or failed.group(2)}", err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST,
                param="lora_path")
        return response

    serving_models_cls.load_lora_adapter = load_lora_adapter


def _no_lora_term_without_adapter(op):
    """A torch_ops bgmv op whose tokens of slot -1 get a zero LoRA term: their inputs are zeroed,
    so shrink writes 0, and expand adds (or writes) 0, whatever the last slot holds."""

    @functools.wraps(op)
    def masked(inputs, weights, output, indices, *args, **kwargs):
        unadapted = indices < 0
        if unadapted.any():
            inputs = inputs.masked_fill(unadapted.unsqueeze(-1), 0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    return masked


def _patch_cpu_lora_ops() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        masked = _no_lora_term_without_adapter(getattr(lora_ops, name))
        setattr(lora_ops, name, masked)    # what sgmv_* call
        setattr(punica_cpu, name, masked)  # what the CPU wrapper's decode path calls


def install() -> None:
    """Patch vLLM once in this process (vLLM calls the plugin's register() in each process)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.worker_manager import WorkerLoRAManager

    if getattr(WorkerLoRAManager._load_adapter, "_ovis_patched", False):
        return
    _patch_worker_load(WorkerLoRAManager)
    _patch_load_endpoint(OpenAIServingModels)
    _patch_cpu_lora_ops()
    WorkerLoRAManager._load_adapter._ovis_patched = True
