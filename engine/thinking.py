"""The reference's thinking budget for Ovis2.5/2.6, as a vLLM logits processor.

AIDC-AI's chat() (ovis/model/modeling_ovis.py; the checkpoints' generate does the same) thinks
in two phases when thinking is on and a budget B > 0 is given:
1. generate at most B tokens;
2. if they hold `<|im_end|>`, that is the answer. Otherwise, if they hold no `</think>`, append
   TRANSITION (tokenized on its own) and generate the rest of max_new_tokens after it.
So the output is the unbudgeted greedy output up to B tokens, then TRANSITION when the first B
tokens neither closed the thinking nor ended the answer, then the model's own continuation.
This processor forces exactly that: output tokens B .. B+len(TRANSITION)-1 are TRANSITION's
tokens when output tokens 0 .. B-1 hold neither `</think>` nor `<|im_end|>`, and nothing else is
touched. It reads only the output so far, so it keeps no per-step state.

Where this differs from the reference (docs/reference.md, "Thinking"):
- B = 0 forces TRANSITION at once (the two-phase rule with an empty first phase). GitHub's
  chat() takes 0 as "no budget"; the checkpoints' generate fails on it.
- The output stops at max_tokens, inside TRANSITION if need be (finish_reason "length"); the
  reference appends all of TRANSITION even past max_new_tokens.
- A first phase that ends on `<|endoftext|>` ends the request (vLLM stops there); the reference
  would append TRANSITION and go on.
- A prompt that ends with the empty think block (thinking off) is not budgeted, as in the
  reference, where the budget applies only with enable_thinking.

Requests give the budget as vLLM's `thinking_token_budget`. vLLM's own handling of that field
(--reasoning-config; vllm/v1/sample/thinking_budget_state.py) counts from a `<think>` and forces
--reasoning-config's end string: other tokens than the reference's. `validate_params`, which
vLLM runs on every request before its own check, moves the budget into `extra_args`, so only
this processor acts on it and vLLM needs no reasoning config for it.

vLLM 0.32 runs custom logits processors through two interfaces: the V1 model runner's (CPU,
and GPU with VLLM_USE_V2_MODEL_RUNNER=0) and Model Runner V2's (the GPU default). The class
implements both; the V1 path is what the CPU tests run.
"""

from __future__ import annotations

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

# The reference's text, appended when the budget runs out inside the thinking.
TRANSITION = ("\n\nConsidering the limited time by the user, I have to give the solution based on "
              "the thinking directly now.\n</think>\n\n")
THINK_END = "</think>"
ANSWER_END = "<|im_end|>"
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"  # the prompt's end when thinking is off
BUDGET_KEY = "ovis_thinking_budget"  # in SamplingParams.extra_args


def _budget(params) -> int | None:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(BUDGET_KEY)


class ThinkingBudget(V1LogitsProcessor, V2LogitsProcessor):
    """Forces TRANSITION where the reference's two-phase generation appends it."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        budget = sampling_params.thinking_token_budget
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise VLLMValidationError(f"thinking_token_budget must be an integer >= 0, not {budget!r}",
                                      parameter="thinking_token_budget")
        sampling_params.thinking_token_budget = None
        sampling_params.extra_args = {**(sampling_params.extra_args or {}), BUDGET_KEY: budget}

    def __init__(self, vllm_config, *runner_args) -> None:
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.transition = encode(TRANSITION)
        self.stop_thinking = {encode(THINK_END)[0], encode(ANSWER_END)[0]}
        self.thinking_off = encode(EMPTY_THINK_BLOCK)
        if len(runner_args) == 1:  # Model Runner V2: (request state)
            self._init_v2(runner_args[0])
        else:  # V1: (device, is_pin_memory)
            self.budgets: dict[int, tuple[int, list[int]]] = {}  # batch index -> (B, output ids)

    def forced_token(self, budget: int, output: list[int]) -> int | None:
        """The token the reference has at output position len(output), if it is forced."""
        k = len(output) - budget
        if not 0 <= k < len(self.transition) or self.stop_thinking.intersection(output[:budget]):
            return None
        return self.transition[k]

    def budgeted(self, prompt: list[int] | None, budget: int | None) -> bool:
        n = len(self.thinking_off)
        return budget is not None and not (prompt is not None and list(prompt[-n:]) == self.thinking_off)

    # ---- V1 model runner ---------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.budgets.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            budget = _budget(params)
            if self.budgeted(prompt, budget):
                self.budgets[index] = (budget, output)
            else:
                self.budgets.pop(index, None)
        for a, b, direction in batch_update.moved:
            moved_a, moved_b = self.budgets.pop(a, None), self.budgets.pop(b, None)
            if moved_a is not None:
                self.budgets[b] = moved_a
            if moved_b is not None and direction.name == "SWAP":
                self.budgets[a] = moved_b

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        for index, (budget, output) in self.budgets.items():
            token = self.forced_token(budget, output)
            if token is not None:
                logits[index] = float("-inf")
                logits[index, token] = 0.0
        return logits

    # ---- Model Runner V2 (GPU; not run by the CPU tests) ---------------------------------------
    def _init_v2(self, req_states) -> None:
        import numpy as np

        self.req_states = req_states
        self.slot_budget = np.full(req_states.max_num_reqs, -1, dtype=np.int64)
        self.transition_gpu = torch.tensor(self.transition, device=req_states.device)
        self.stop_gpu = torch.tensor(sorted(self.stop_thinking), device=req_states.device)
        self.thinking_off_gpu = torch.tensor(self.thinking_off, device=req_states.device)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        budget = _budget(sampling_params)
        self.slot_budget[req_idx] = -1 if budget is None else budget
        return budget is not None

    def _apply_v2(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """All on the device, no sync: for each row of a budgeted request, its output length
        from its position, its first B output tokens from the committed token ids (the newest,
        this step's input, from input_ids), then TRANSITION's token where one is due."""
        import numpy as np

        slots_np = ctx.idx_mapping_np
        if len(slots_np) != logits.shape[0]:  # one row per request only (no speculative rows)
            return logits
        budgets_np = self.slot_budget[slots_np]
        rows_np = np.nonzero(budgets_np >= 0)[0]
        if len(rows_np) == 0:
            return logits
        device = logits.device
        rows = torch.from_numpy(rows_np).to(device, non_blocking=True)
        budgets = torch.from_numpy(budgets_np[rows_np]).to(device, non_blocking=True)
        slots = ctx.idx_mapping[rows].long()
        prompt_len = self.req_states.prompt_len.gpu[slots].long()
        pos = ctx.pos[rows].long()
        k = pos + 1 - prompt_len - budgets  # index into TRANSITION of the token sampled now
        width = int(budgets_np[rows_np].max()) or 1
        committed, newest = self.req_states.all_token_ids.gpu, ctx.input_ids[rows].long()[:, None]

        def tokens_at(positions: torch.Tensor) -> torch.Tensor:  # [rows, k] sequence positions
            ids = committed[slots[:, None], positions.clamp(0, committed.shape[1] - 1)].long()
            return torch.where(positions == pos[:, None], newest, ids)

        offsets = prompt_len[:, None] + torch.arange(width, device=device)[None, :]
        in_budget = torch.arange(width, device=device)[None, :] < budgets[:, None]
        closed = (torch.isin(tokens_at(offsets), self.stop_gpu) & in_budget).any(dim=1)
        n_off = len(self.thinking_off)
        tail = prompt_len[:, None] - n_off + torch.arange(n_off, device=device)[None, :]
        off = (tokens_at(tail) == self.thinking_off_gpu[None, :]).all(dim=1)
        due = (k >= 0) & (k < len(self.transition)) & ~closed & ~off
        token = self.transition_gpu[k.clamp(0, len(self.transition) - 1)]
        forced = torch.full_like(logits[rows], float("-inf"))
        forced.scatter_(1, token[:, None], 0.0)
        logits[rows] = torch.where(due[:, None], forced, logits[rows])
        return logits


class NoThinking(V1LogitsProcessor, V2LogitsProcessor):
    """For members without a thinking mode (Ovis1.6, Ovis2): a thinking budget is a 400 that
    says so, where vLLM alone would ask for a reasoning parser."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if sampling_params.thinking_token_budget is not None:
            raise VLLMValidationError(
                "thinking_token_budget: this checkpoint has no thinking mode (Ovis1.6 and Ovis2 "
                "answer directly; Ovis2.5 and Ovis2.6 think)", parameter="thinking_token_budget")

    def __init__(self, vllm_config, *runner_args) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits
