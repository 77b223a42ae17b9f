"""Make each difference of vLLM's built-in Ovis (docs/reference.md, "Where vLLM 0.32's built-in
Ovis differs") visible, on the `tiny` checkpoint and on each member preset (Ovis1.6 and Ovis2).

The built-in runs in a subprocess with our plugin disabled (VLLM_PLUGINS=none) on the same
checkpoints. Its prompt log-probabilities are far from the reference's, each numerical difference
that applies to the member (indicator order, SigLIP post-norm, and the sqrt(hidden) scale on
Gemma2) moves the reference by itself, and emulating them all reproduces the built-in: so these
are the whole story. A prompt with images of different crop grids is rejected by the built-in on
every member, while ours matches the reference on it (tests/test_members.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from ovis_vllm.engine.members import member_of
from tests.conftest import SEED
from tests.helpers import SIDE, chat_prompt, rand_image
from tests.ovis_reference import BUILTIN_QUIRKS, ReferenceOvis

EMULATION_ATOL = 2e-4   # built-in vs the reference with all three quirks emulated (fp32)
VISIBLE_GAP = 1e-2      # a difference is "visible" when it moves some prompt logprob this much
MEMBER_PRESETS = ["ovis1.6-gemma2-9b", "ovis1.6-gemma2-27b", "ovis1.6-llama3.2-3b", "ovis2-1b"]


@pytest.fixture(scope="module")
def builtin(tiny_checkpoint, reference, tmp_path_factory):
    """name -> (built-in output, {case: result}, cases, reference), for `tiny` and the members."""
    from ovis_vllm.engine.checkpoints import write_checkpoint

    tmp = tmp_path_factory.mktemp("builtin")
    # Fresh images per case: the built-in's processor cache would otherwise hand it one image at
    # a time, and the ragged stacking of difference 4 only happens within one processor call.
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
    checkpoints = {"tiny": (tiny_checkpoint, reference)}
    for preset in MEMBER_PRESETS:
        path = write_checkpoint(tmp / preset, preset, seed=SEED)
        checkpoints[preset] = (path, ReferenceOvis(path))
    spec = []
    for name, (path, ref) in checkpoints.items():
        # The reference's conversation format, as our server serves it.
        template = member_of(ref.config).conversation.chat_template
        spec.append({"model": str(path), "cases": [
            {"prompt": chat_prompt(ref.tokenizer, turns, template), "images": paths[case]}
            for case, (turns, _) in cases.items()]})
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_PLUGINS="none")
    proc = subprocess.run([sys.executable, "-m", "tests.builtin_runner", str(tmp / "spec.json"),
                           str(tmp / "out.json")], env=env, timeout=900, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads((tmp / "out.json").read_text())
    return {name: (out, dict(zip(cases, out["results"])), cases, ref)
            for (name, (_, ref)), out in zip(checkpoints.items(), outs)}


def _reference_logprobs(reference, turns, images, ids, quirks=()):
    embeds, _ = reference.merged_embeddings(reference.format_conversation(turns), images, quirks=quirks)
    lp = torch.log_softmax(reference.logits(embeds), dim=-1)
    return torch.tensor([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])


def test_builtin_is_vllms_own_class(builtin):
    for out, _, _, _ in builtin.values():
        assert out["model_class"] == "vllm.model_executor.models.ovis.Ovis"


@pytest.mark.parametrize("name", ["tiny"] + MEMBER_PRESETS)
def test_builtin_differs_and_its_quirks_explain_it(builtin, name):
    """The built-in's prompt log-probabilities are far from the reference's; the quirks that apply
    to the member (the embedding scale only where the LLM has one, the post-norm only on SigLIP:
    the built-in builds AIMv2 without its final norm) each move the reference, and all of them
    together reproduce the built-in."""
    _, results, cases, reference = builtin[name]
    turns, images = cases["one_image"]
    ids = results["one_image"]["prompt_token_ids"]
    builtin_logprobs = torch.tensor(results["one_image"]["prompt_logprobs"][1:])
    applies = {"unscaled_visual": reference.embedding_scale is not None,
               "post_layernorm": reference.backbone_type != "aimv2"}
    quirks = [q for q in BUILTIN_QUIRKS if applies.get(q, True)]

    exact = _reference_logprobs(reference, turns, images, ids)
    assert (builtin_logprobs - exact).abs().max() > VISIBLE_GAP, "the built-in should differ"

    emulated = _reference_logprobs(reference, turns, images, ids, quirks=quirks)
    assert (builtin_logprobs - emulated).abs().max() < EMULATION_ATOL

    for quirk in quirks:  # each one matters on its own
        alone = _reference_logprobs(reference, turns, images, ids, quirks=(quirk,))
        assert (alone - exact).abs().max() > VISIBLE_GAP, quirk


@pytest.mark.parametrize("name", ["tiny"] + MEMBER_PRESETS)
def test_builtin_rejects_images_with_different_grids(builtin, name):
    _, results, _, _ = builtin[name]
    error = results["different_grids"].get("error", "")
    assert "expected sequence of length" in error, results["different_grids"]


@pytest.mark.parametrize("name", MEMBER_PRESETS)
def test_builtin_reaches_the_reference_token_ids(builtin, name):
    """Not a difference: with the published tokenizer kinds the built-in does not find `<image>`'s
    own ids in the whole-text tokenization, falls back to replacing it in the decoded text and
    re-tokenizes; the pad tokens it inserts are special tokens, so the text around each image is
    tokenized piece by piece, as in the reference."""
    _, results, cases, reference = builtin[name]
    turns, images = cases["one_image"]
    _, ref_ids = reference.merged_embeddings(reference.format_conversation(turns), images)
    assert results["one_image"]["prompt_token_ids"] == [
        reference.image_pad_id if t < 0 else t for t in ref_ids]
