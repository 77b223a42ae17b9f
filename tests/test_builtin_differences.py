"""Make each listed difference of vLLM's built-in Ovis (REFERENCE.md items 1-4) visible.

The built-in runs in a subprocess with our plugin disabled (VLLM_PLUGINS=none) on the same
checkpoint. Its prompt log-probabilities are far from the reference's, each of the three
numerical differences moves the reference by itself, and emulating all three in the reference
reproduces the built-in: so these are the whole story. A prompt with images of different crop
grids is rejected by the built-in (item 4) while ours matches the reference on it
(tests/test_engine_parity.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.ovis_reference import BUILTIN_QUIRKS
from tests.test_engine_parity import SIDE, chat_prompt, rand_image

EMULATION_ATOL = 2e-4   # built-in vs the reference with all three quirks emulated (fp32)
VISIBLE_GAP = 1e-2      # a difference is "visible" when it moves some prompt logprob this much


@pytest.fixture(scope="module")
def builtin_results(tiny_checkpoint, reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("builtin")
    # Fresh images per case: the built-in's processor cache would otherwise hand it one image at
    # a time, and the ragged stacking of item 4 only happens within one processor call.
    images = {"one": rand_image(3 * SIDE, 2 * SIDE, 40), "a": rand_image(3 * SIDE, 3 * SIDE, 41),
              "b": rand_image(SIDE, SIDE, 42)}
    for name, image in images.items():
        image.save(tmp / f"{name}.png")
    cases = {
        "one_image": ([("user", "<image>\nDescribe the image.")], [images["one"]]),
        "different_grids": ([("user", "<image>\n<image>\nCompare them.")], [images["a"], images["b"]]),
    }
    paths = {"one_image": [str(tmp / "one.png")],
             "different_grids": [str(tmp / "a.png"), str(tmp / "b.png")]}
    tok = reference.tokenizer
    spec = {"model": str(tiny_checkpoint),
            "cases": [{"prompt": chat_prompt(tok, turns), "images": paths[name]}
                      for name, (turns, _) in cases.items()]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_PLUGINS="none")
    proc = subprocess.run([sys.executable, "-m", "tests.builtin_runner", str(tmp / "spec.json"),
                           str(tmp / "out.json")], env=env, timeout=600, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    return out, dict(zip(cases, out["results"])), cases


def _reference_logprobs(reference, turns, images, ids, quirks=()):
    embeds, _ = reference.merged_embeddings(reference.format_conversation(turns), images, quirks=quirks)
    lp = torch.log_softmax(reference.logits(embeds), dim=-1)
    return torch.tensor([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])


def test_builtin_is_vllms_own_class(builtin_results):
    out, _, _ = builtin_results
    assert out["model_class"] == "vllm.model_executor.models.ovis.Ovis"


def test_builtin_differs_and_the_three_quirks_explain_it(builtin_results, reference):
    _, results, cases = builtin_results
    turns, images = cases["one_image"]
    ids = results["one_image"]["prompt_token_ids"]
    builtin = torch.tensor(results["one_image"]["prompt_logprobs"][1:])

    exact = _reference_logprobs(reference, turns, images, ids)
    assert (builtin - exact).abs().max() > VISIBLE_GAP, "the built-in should differ from the reference"

    emulated = _reference_logprobs(reference, turns, images, ids, quirks=BUILTIN_QUIRKS)
    assert (builtin - emulated).abs().max() < EMULATION_ATOL

    for quirk in BUILTIN_QUIRKS:  # each one matters on its own
        alone = _reference_logprobs(reference, turns, images, ids, quirks=(quirk,))
        assert (alone - exact).abs().max() > VISIBLE_GAP, quirk


def test_builtin_rejects_images_with_different_grids(builtin_results):
    _, results, _ = builtin_results
    error = results["different_grids"].get("error", "")
    assert "expected sequence of length" in error, results["different_grids"]
