"""Each way vLLM 0.32's built-in Ovis2_5 differs from the reference, measured on the same
checkpoints (docs/reference.md, "Ovis2.5 and Ovis2.6").

The built-in runs in a subprocess with our plugin off (VLLM_PLUGINS=none; tests/builtin_runner.py)
on an Ovis2.5-2B-shaped checkpoint. On a plain RGB image it agrees with the reference, so what
remains are these, each shown here while ours matches the reference on the same input
(tests/test_ovis2_5.py):
- transparency: vLLM composites an RGBA image onto white before the built-in sees it; the
  reference's convert("RGB") drops alpha;
- token ids: the built-in adds its visual tokens to the tokenizer at run time and assumes its
  indicators land at 151672..151675; with one more token in the tokenizer (a fine-tune that added
  one) its visual atom lands at 151672 and is taken for an indicator: the first image request
  kills the engine (RuntimeError in split_with_sizes, EngineDeadError for every request after);
- memory profiling: it budgets 12,544 tokens for a 1792x1792 image that takes 3,138.
Not shown here: its resize backend (transformers picks torchvision's when installed; torchvision
cannot sit beside vLLM's CPU torch): measured by benchmarks/resize_backends.py in a venv of its
own (docs/reference.md: at most one 8-bit level, prompt log-probabilities within 2.1e-4).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.conftest import SEED
from tests.helpers import rand_image, with_extra_token
from tests.ovis25_reference import ReferenceOvis25, content_items

AGREE_ATOL = 2e-4
VISIBLE_GAP = 1e-2


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    tmp = tmp_path_factory.mktemp("builtin25")
    plain = write_checkpoint(tmp / "plain", "ovis2.5-2b", seed=SEED)
    extra = with_extra_token(write_checkpoint(tmp / "extra", "ovis2.5-2b", seed=SEED))
    rgb, rgba = rand_image(300, 200, SEED % 997), rand_image(300, 200, SEED % 997 + 1, mode="RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # alpha from 0 to 255
    rgb.save(tmp / "rgb.png")
    rgba.save(tmp / "rgba.png")
    references = {"plain": ReferenceOvis25(plain), "extra": ReferenceOvis25(extra)}
    turns = [("user", content_items("<image>\nDescribe the image."))]
    prompt = references["plain"].render_chat(turns)
    spec = [{"model": str(plain), "architecture": "Ovis2_5", "cases": [
                {"prompt": prompt, "images": [str(tmp / "rgb.png")]},
                {"prompt": prompt, "images": [str(tmp / "rgba.png")]}]},
            {"model": str(extra), "architecture": "Ovis2_5", "engine_core_process": True, "cases": [
                {"prompt": prompt, "images": [str(tmp / "rgb.png")]}]}]
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_PLUGINS="none")
    proc = subprocess.run([sys.executable, "-m", "tests.builtin_runner", str(tmp / "spec.json"),
                           str(tmp / "out.json")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    return SimpleNamespace(out=out, references=references, turns=turns, rgb=rgb, rgba=rgba)


def gap(result, reference, turns, image) -> float:
    """Largest |built-in - reference| prompt log-probability, over positions both score."""
    embeds, ids = reference.merged_embeddings(reference.format_conversation(turns), [image])
    assert len(ids) == len(result["prompt_token_ids"])
    logprobs = torch.log_softmax(reference.logits(embeds), dim=-1)
    got = result["prompt_token_ids"]
    return max(abs(result["prompt_logprobs"][i] - logprobs[i - 1, got[i]].item())
               for i in range(1, len(ids)) if ids[i] >= 0)


def test_builtin_serves_with_its_own_class(builtin):
    assert [o["model_class"] for o in builtin.out] == ["vllm.model_executor.models.ovis2_5.Ovis2_5"] * 2


def test_builtin_agrees_on_a_plain_image(builtin):
    assert gap(builtin.out[0]["results"][0], builtin.references["plain"], builtin.turns, builtin.rgb) < AGREE_ATOL


def test_builtin_composites_transparency_onto_white(builtin):
    result, reference = builtin.out[0]["results"][1], builtin.references["plain"]
    assert gap(result, reference, builtin.turns, builtin.rgba) > VISIBLE_GAP
    white = Image.new("RGB", builtin.rgba.size, (255, 255, 255))
    white.paste(builtin.rgba, mask=builtin.rgba.split()[3])
    assert gap(result, reference, builtin.turns, white) < AGREE_ATOL  # that is the whole story


def test_builtin_dies_when_the_tokenizer_has_another_size(builtin):
    [result] = builtin.out[1]["results"]
    assert result.get("error", "").startswith("EngineDeadError"), result


def test_builtin_profiles_four_times_the_tokens_of_the_largest_image():
    """Its budget per image (get_max_image_tokens) against the tokens a 1792x1792 image takes in
    both (3136 visual rows and 2 indicators)."""
    from vllm.model_executor.models.ovis2_5 import Ovis2_5ProcessingInfo

    from ovis_vllm.engine.configs import Siglip2NavitConfig
    from ovis_vllm.engine.preprocess_navit import max_resized_pixels

    vit = Siglip2NavitConfig(patch_size=16, hidden_stride=2, temporal_patch_size=1)
    info = SimpleNamespace(get_hf_config=lambda: SimpleNamespace(vit_config=vit))
    info.get_image_size_with_most_features = lambda: Ovis2_5ProcessingInfo.get_image_size_with_most_features(info)
    info.get_num_image_tokens = lambda **kw: Ovis2_5ProcessingInfo.get_num_image_tokens(info, **kw)
    builtin_budget = Ovis2_5ProcessingInfo.get_max_image_tokens(info)
    ours = max_resized_pixels(32, 448 * 448, 1792 * 1792) // 32**2 + 2
    assert (builtin_budget, ours) == (12544, 3138)
