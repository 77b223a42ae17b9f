"""KV-cache pressure: with a deliberately small KV cache, concurrent image requests are
preempted and recomputed, and their answers equal the one-at-a-time answers."""

from __future__ import annotations

import pytest

from tests.helpers import SIDE, make_llm, prompt_logprobs, rand_image, run_engine, shutdown, tokens

BLOCKS = 24  # x 16 tokens: room for two or three of the requests below at once


@pytest.fixture(scope="module")
def small_kv_llm(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, num_gpu_blocks_override=BLOCKS, max_model_len=(BLOCKS - 2) * 16,  # the longest vLLM accepts for 24 blocks
                      block_size=16, max_num_seqs=16, disable_log_stats=False)
    yield engine
    shutdown(engine)


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def test_preempted_image_requests_equal_one_at_a_time(small_kv_llm):
    cases = []
    for i in range(12):
        grid = [(SIDE, SIDE), (2 * SIDE, SIDE), (3 * SIDE, 3 * SIDE)][i % 3]
        cases.append(([("user", f"<image>\nRequest {i}: describe the image in detail.")],
                      [rand_image(*grid, 300 + i)]))
    single = [run_engine(small_kv_llm, [case], max_new_tokens=64, ignore_eos=True)[0]
              for case in cases]
    before = counter(small_kv_llm, "vllm:num_preemptions")
    together = run_engine(small_kv_llm, cases, max_new_tokens=64, ignore_eos=True)
    preempted = counter(small_kv_llm, "vllm:num_preemptions") - before
    print(f"{preempted:.0f} preemptions")
    assert preempted > 0, "the KV cache was large enough: nothing was preempted"
    assert tokens(together) == tokens(single)
    for a, b in zip(together, single):
        assert max(abs(x - y) for x, y in zip(prompt_logprobs(a), prompt_logprobs(b))) < 1e-4
