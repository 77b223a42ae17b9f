"""The GPTQ-Int4 releases (Ovis1.6-Gemma2-9B and -Llama3.2-3B; Ovis2-2B ... 34B) on vLLM's CPU
backend.

AutoGPTQ (Ovis1.6) and GPTQModel (Ovis2) quantized the LLM's decoder layers only; the vision tower, the visual head and the VTE
stay floating point. Generated GPTQ-shaped checkpoints (AutoGPTQ's tensor layout, file name,
quantize_config.json and config.json quantization_config) are served by our plugin in bf16 (the
GPTQ kernels take bf16/fp16 activations only) and checked against the reference run in fp32 on
the weights it dequantizes itself (tests/ovis_reference.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ovis_vllm.engine.cpu_support import cpu_cannot_serve
from ovis_vllm.engine.members import member_of
from tests.conftest import SEED
from tests.helpers import (
    BF16_LOGPROB_ATOL,
    BF16_TIE_GAP,
    SIDE,
    assert_parity,
    make_llm,
    rand_image,
    run_engine,
    shutdown,
)
from tests.ovis_reference import ReferenceOvis


@pytest.fixture(scope="module", params=["ovis1.6-gemma2-9b-gptq-int4", "ovis1.6-llama3.2-3b-gptq-int4",
                                        "ovis2-8b-gptq-int4"])
def gptq(request, tmp_path_factory):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=SEED)
    if reason := cpu_cannot_serve(SimpleNamespace(**json.loads((path / "config.json").read_text()))):
        pytest.skip(reason)  # vLLM alone fails there too (test_gptq_refused_where_vllm_has_no_kernel)
    template = member_of(json.loads((path / "config.json").read_text())).conversation.chat_template
    engine = make_llm(path, dtype="bfloat16", max_num_seqs=4)
    yield path, template, engine
    shutdown(engine)


def quant_methods(model):  # module level: pickled to the worker
    from vllm.model_executor.layers.linear import LinearBase

    return {name: type(module.quant_method).__name__ for name, module in model.named_modules()
            if isinstance(module, LinearBase)}


def test_quantization_reaches_the_llm_only(gptq):
    _, _, engine = gptq
    [methods] = engine.apply_model(quant_methods)
    llm = {m for name, m in methods.items() if name.startswith("llm.model.layers.")}
    vision = {m for name, m in methods.items() if name.startswith("visual_tokenizer.")}
    assert llm and "UnquantizedLinearMethod" not in llm, llm
    assert vision == {"UnquantizedLinearMethod"}, vision


def test_gptq_matches_the_dequantized_reference(gptq):
    path, template, engine = gptq
    reference = ReferenceOvis(path)
    cases = [([("user", "<image>\nDescribe the image.")], [rand_image(3 * SIDE, 2 * SIDE, 5)]),
             ([("user", "Image 1:<image>\nImage 2:<image>\nCompare.")],
              [rand_image(50, 50, 6), rand_image(3 * SIDE, 3 * SIDE, 7)])]
    outs = run_engine(engine, cases, chat_template=template)
    for out, (turns, images) in zip(outs, cases):
        assert_parity(out, reference, turns, images, atol=BF16_LOGPROB_ATOL, tie_gap=BF16_TIE_GAP)


def test_gptq_refused_where_vllm_has_no_kernel(tmp_path, monkeypatch):
    """Where vLLM's CPU build has no GPTQ kernel (AVX2: checked by hand, vLLM alone with the
    built-in Ovis starts, then its engine dies at the first request on the missing
    cpu_gemm_wna16), server.py stops at start with the reason; a float checkpoint still starts."""
    import torch

    from ovis_vllm import server
    from ovis_vllm.engine import cpu_support
    from ovis_vllm.engine.checkpoints import write_checkpoint

    if torch.cuda.is_available():
        pytest.skip("the refusal is for vLLM's CPU platform")
    monkeypatch.setattr(cpu_support, "wna16_kernel_available", lambda: False)
    path = write_checkpoint(tmp_path / "gptq", "ovis1.6-llama3.2-3b-gptq-int4", seed=SEED)
    with pytest.raises(SystemExit, match="GPTQ checkpoint cannot be served on this CPU .*cpu_gemm_wna16"):
        server.build_argv(["--model", str(path)])
    float_path = write_checkpoint(tmp_path / "float", "ovis1.6-llama3.2-3b", seed=SEED)
    assert "--chat-template" in server.build_argv(["--model", str(float_path)])
