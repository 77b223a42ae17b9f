"""engine/thinking.py's logits processor without an engine: both runner interfaces force what
the reference's two-phase generation appends (tests/test_ovis2_5.py checks the served tokens
against the reference itself; this file covers the Model Runner V2 path, which only a GPU runs,
and the V1 path's batch bookkeeping)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import SEED


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from ovis_vllm.engine.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("ovis2.5"), "ovis2.5-2b", seed=SEED)
    return AutoTokenizer.from_pretrained(path)


def processor(tokenizer, monkeypatch, *runner_args):
    import vllm.tokenizers

    from ovis_vllm.engine.thinking import ThinkingBudget

    monkeypatch.setattr(vllm.tokenizers, "cached_tokenizer_from_config", lambda model_config: tokenizer)
    return ThinkingBudget(SimpleNamespace(model_config=None), *runner_args)


def reference_forced(proc, prompt, budget, output):
    """The reference's token at output position len(output), if it is forced: TRANSITION's,
    when the first `budget` tokens hold neither `</think>` nor `<|im_end|>`, in a thinking turn."""
    if prompt[-len(proc.thinking_off):] == proc.thinking_off:
        return None
    k = len(output) - budget
    if 0 <= k < len(proc.transition) and not proc.stop_thinking & set(output[:budget]):
        return proc.transition[k]
    return None


def random_request(proc, rng, vocab):
    """(prompt, budget, output) around the interesting places: outputs up to just past
    TRANSITION, with or without `</think>`/`<|im_end|>` before or after the budget; prompts that
    end thinking on or off."""
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(3, 12))]
    if rng.random() < 0.2:
        prompt += proc.thinking_off
    budget = rng.choice([0, 1, 2, 5, 9])
    n = rng.randrange(0, budget + len(proc.transition) + 3)
    output = [rng.randrange(vocab) for _ in range(n)]
    forced = 0
    for i in range(n):  # where the reference forces, the output holds what it forced
        token = reference_forced(proc, prompt, budget, output[:i])
        if token is not None:
            output[i] = token
            forced += 1
    if n and rng.random() < 0.3:
        output[rng.randrange(n)] = rng.choice(sorted(proc.stop_thinking))
    return prompt, budget, output


def test_model_runner_v2_path_forces_the_reference_tokens(tokenizer, monkeypatch):
    """Rows in any slot order, the newest token not yet committed (only in input_ids), prompts
    of different lengths: `_apply_v2` forces exactly the reference's tokens and leaves every
    other row as it was."""
    rng = random.Random(SEED)
    vocab, max_len, slots = 2000, 128, 16
    all_ids = torch.full((slots, max_len), -7, dtype=torch.int64)
    prompt_len = torch.zeros(slots, dtype=torch.int64)
    req_states = SimpleNamespace(max_num_reqs=slots, device=torch.device("cpu"),
                                 all_token_ids=SimpleNamespace(gpu=all_ids),
                                 prompt_len=SimpleNamespace(gpu=prompt_len))
    proc = processor(tokenizer, monkeypatch, req_states)
    vocab = max(vocab, max(proc.transition + sorted(proc.stop_thinking)) + 1)
    for _ in range(200):
        batch = rng.sample(range(slots), rng.randrange(1, slots))
        rows, want = [], []
        for slot in batch:
            prompt, budget, output = random_request(proc, rng, vocab)
            budgeted = rng.random() < 0.8
            proc.add_request(slot, SimpleNamespace(extra_args={"ovis_thinking_budget": budget} if budgeted else None))
            seq = prompt + output
            all_ids[slot] = -7
            all_ids[slot, :len(seq) - 1] = torch.tensor(seq[:-1])  # the newest token: input_ids only
            prompt_len[slot] = len(prompt)
            rows.append((len(seq) - 1, seq[-1]))
            want.append(reference_forced(proc, prompt, budget, output) if budgeted else None)
        # A row samples the token after its newest one (the prompt's last, at prefill).
        ctx = SimpleNamespace(idx_mapping_np=torch.tensor(batch).numpy(), idx_mapping=torch.tensor(batch),
                              pos=torch.tensor([p for p, _ in rows]), input_ids=torch.tensor([t for _, t in rows]))
        logits = torch.randn(len(batch), vocab)
        before = logits.clone()
        after = proc.apply(logits, ctx)
        for row, token in enumerate(want):
            if token is None:
                assert torch.equal(after[row], before[row]), row
            else:
                assert int(after[row].argmax()) == token and torch.isinf(after[row]).sum() == vocab - 1, row


def test_v1_path_follows_the_batch(tokenizer, monkeypatch):
    """Requests added, removed, moved and swapped in the persistent batch keep their own budget
    and output list; the forced rows are the reference's."""
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    proc = processor(tokenizer, monkeypatch, torch.device("cpu"), False)
    rng = random.Random(SEED + 1)
    vocab = max(proc.transition + sorted(proc.stop_thinking)) + 1
    requests = [random_request(proc, rng, vocab) for _ in range(4)]
    params = lambda budget: SimpleNamespace(extra_args={"ovis_thinking_budget": budget})  # noqa: E731
    added = [(i, params(b), p, o) for i, (p, b, o) in enumerate(requests)]
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    proc.update_state(BatchUpdate(batch_size=3, removed=[3], added=[], moved=[
        (0, 3, MoveDirectionality.UNIDIRECTIONAL), (1, 2, MoveDirectionality.SWAP)]))
    where = {3: requests[0], 2: requests[1], 1: requests[2]}  # batch index -> request
    assert set(proc.budgets) == {i for i, (p, b, o) in where.items()
                                 if p[-len(proc.thinking_off):] != proc.thinking_off}
    logits = torch.randn(4, vocab)
    before = logits.clone()
    after = proc.apply(logits)
    for index in range(4):
        token = reference_forced(proc, *where[index]) if index in where else None
        if token is None:
            assert torch.equal(after[index], before[index])
        else:
            assert int(after[index].argmax()) == token


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Model Runner V2 runs on CUDA only")
def test_cuda_model_runner_v2_serves_the_reference_budget(tmp_path):
    """On a GPU (benchmarks/gpu_check.py runs this): the engine's own runner (Model Runner V2 by
    default) with the processor gives the reference's two-phase tokens, greedy, fp32, for
    budgets 0, 2 and none, in one batch."""
    from vllm import SamplingParams

    from ovis_vllm.engine.checkpoints import write_checkpoint
    from tests.helpers import make_llm, shutdown
    from tests.ovis25_reference import ReferenceOvis25

    path = write_checkpoint(tmp_path / "ovis2.6", "ovis2.6-2b", seed=SEED)
    reference = ReferenceOvis25(path)
    engine = make_llm(path, logits_processors=["ovis_vllm.engine.thinking:ThinkingBudget"])
    try:
        raw = reference.format_conversation([("user", "Think it over.")], enable_thinking=True)
        embeds, ids = reference.merged_embeddings(raw)
        budgets = [0, 2, None]
        params = [SamplingParams(temperature=0, max_tokens=90, thinking_token_budget=b) for b in budgets]
        outs = engine.generate([{"prompt_token_ids": ids}] * len(budgets), params, use_tqdm=False)
        for budget, out in zip(budgets, outs):
            want = reference.greedy(embeds, 90)[0] if budget is None else \
                reference.generate_with_thinking_budget(embeds, budget, 90)
            assert list(out.outputs[0].token_ids) == want[:90], budget
    finally:
        shutdown(engine)
