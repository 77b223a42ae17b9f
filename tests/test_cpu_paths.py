"""The CPU paths are chosen by what this CPU supports, as vLLM chooses for its own layers.

- oneDNN packing (kernels.PackedMatrix) where vLLM's dispatch_cpu_unquantized_gemm gives its own
  Linear layers oneDNN, torch where it does not (bf16 on x86 without AVX-512): the oracle is
  vLLM's dispatch itself, run on a layer of each dtype, here and under oneDNN's
  ONEDNN_MAX_CPU_ISA=AVX2 (what an AVX2-only CPU sees, on any x86 machine).
- The unpacked fallback computes what the packed path does, with the capability check patched.
- A bf16 engine serves on the path its CPU allows, and says which in its load log line.
- GPTQ where vLLM's CPU build has no GPTQ kernel (AVX2): refused at start with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ovis_vllm import kernels
from tests.conftest import SEED
from tests.helpers import (
    BF16_LOGPROB_ATOL,
    BF16_TIE_GAP,
    ROOT,
    SIDE,
    assert_parity,
    make_llm,
    rand_image,
    run_engine,
    shutdown,
    vllm_packs,
)


CHOICE_SCRIPT = """
import json, torch, kernels
from tests.helpers import vllm_packs
print(json.dumps({str(d): [vllm_packs(d), kernels.onednn_unavailable(d)]
                  for d in (torch.float32, torch.bfloat16)}))
"""


def choices_in_subprocess(**env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHOICE_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=os.environ | env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_follows_vllms_own_choice(dtype):
    why = kernels.onednn_unavailable(dtype)
    assert vllm_packs(dtype) == (why is None), why
    b = torch.randn(64, 32).to(dtype)
    assert kernels.PackedMatrix.supported(b) == (why is None)
    if why is not None:  # a clear refusal, not oneDNN's RuntimeError
        with pytest.raises(ValueError, match="cannot pack"):
            kernels.PackedMatrix(b)


def test_avx2_isa_limit_leaves_bf16_to_torch():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN act as on an AVX2-only CPU: no bf16 matmul, so
    neither vLLM nor we pack bf16; fp32 stays packed. Both choices agree."""
    choices = choices_in_subprocess(ONEDNN_MAX_CPU_ISA="AVX2")
    assert choices["torch.float32"] == [True, None]
    vllm_packed, why = choices["torch.bfloat16"]
    assert not vllm_packed and "no torch.bfloat16 matmul on this CPU" in why, why


def test_unpacked_fallback_computes_the_same(monkeypatch):
    """With the capability check answering no, the head and VTE keep their tensors and give
    what the packed path gives (fp32: packed and torch GEMMs differ in summation order only)."""
    from ovis_vllm.engine.visual_vocab import ShardedHeadLinear, ShardedVTE, VocabShard

    g = torch.Generator().manual_seed(SEED)
    vocab, features, hidden = 301, 48, 40
    shard = VocabShard.of(vocab - kernels.NUM_INDICATORS, 0, 1)
    head_weight = torch.randn(shard.size, features, generator=g)
    vte_weight = torch.randn(vocab, hidden, generator=g)
    x = torch.randn(7, features, generator=g)

    def build():
        head, vte = ShardedHeadLinear(features, shard), ShardedVTE(shard, vocab, hidden, kernels.NUM_INDICATORS)
        head.weight.data.copy_(head_weight)
        vte.load_weights([("weight", vte_weight)])
        head.pack_for_cpu()
        vte.pack_for_cpu()
        logits = head(x)
        ones, zeros = torch.ones(shard.valid), torch.zeros(shard.valid)
        return head, vte, logits, kernels.visual_embedding(logits, ones, zeros, vte.table, 1e-5)

    if kernels.onednn_unavailable(torch.float32) is not None:
        pytest.skip(f"no packed fp32 path to compare with: {kernels.onednn_unavailable(torch.float32)}")
    head, vte, logits, embeds = build()
    assert head.packed is not None and vte.packed is not None and head.weight.numel() == 0
    monkeypatch.setattr(kernels.cpu, "onednn_unavailable", lambda dtype: "patched: no oneDNN here")
    head_t, vte_t, logits_t, embeds_t = build()
    assert head_t.packed is None and vte_t.packed is None
    assert head_t.weight.shape == (shard.size, features) and torch.equal(vte_t.table, vte_weight[:shard.valid])
    torch.testing.assert_close(logits_t, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds_t, embeds, rtol=1e-5, atol=1e-6)


def engine_paths(model):  # module level: pickled to the worker
    import torch

    from ovis_vllm.kernels import onednn_unavailable

    head, vte = model.visual_tokenizer.head[0], model.vte
    return (head.packed is not None, vte.packed is not None,
            onednn_unavailable(torch.bfloat16), model.visual_embedding_paths())


def test_bf16_engine_serves_on_the_path_its_cpu_allows(tiny_checkpoint, reference):
    """A bf16 engine (vLLM's default dtype for this checkpoint on CPU) starts and matches the
    reference within bf16 rounding whether or not oneDNN has bf16 here; its log line names
    the GEMMs and, where they are torch's, why."""
    engine = make_llm(tiny_checkpoint, dtype="bfloat16", max_num_seqs=4)
    try:
        [(head_packed, vte_packed, why, paths)] = engine.apply_model(engine_paths)
        cases = [([("user", "<image>\nDescribe the image.")], [rand_image(3 * SIDE, 2 * SIDE, 11)])]
        outs = run_engine(engine, cases)
    finally:
        shutdown(engine)
    assert head_packed == vte_packed == (why is None)
    assert paths.startswith("chunked CPU path, torch.bfloat16")
    if why is None:
        assert "head GEMM on oneDNN, packed, VTE product on oneDNN, packed" in paths
    else:
        assert "head GEMM on torch, VTE product on torch" in paths and why in paths
    for out, (turns, images) in zip(outs, cases):
        assert_parity(out, reference, turns, images, atol=BF16_LOGPROB_ATOL, tie_gap=BF16_TIE_GAP)
