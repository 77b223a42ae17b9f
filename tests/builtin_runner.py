"""Run vLLM's built-in Ovis (our plugin disabled) on a JSON spec; write prompt logprobs as JSON.

    VLLM_PLUGINS=none python -m tests.builtin_runner SPEC.json OUT.json

SPEC: [{"model": path, "architecture": "Ovis" (default) | "Ovis2_5" | ..., "cases": [{"prompt":
str, "images": [png paths], "mm_kwargs": {...} (optional)}], "engine_core_process": false
(default: the engine runs in this process, as tests.helpers.make_llm's; true: in vLLM's own
processes, where a failing step kills the engine as a server's would)}, ...], one engine per
model, one after another. Images are opened as stored (an RGBA png stays RGBA: vLLM converts it as it does for any
model). OUT: one {"model_class", "results"} per model. A case that the built-in rejects gets
{"error": message} instead of results. Ovis2.5 checkpoints need a config class, which vLLM alone
takes from the checkpoint's remote code: here it gets ours (engine/configs.py, the same keys and
defaults), the plugin itself staying off. Runs in its own process because plugins are
loaded once per process and our plugin would otherwise replace the built-in.
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run_model(spec: dict) -> dict:
    from PIL import Image
    from vllm import LLM, ModelRegistry, SamplingParams

    from ovis_vllm.engine.configs import register_configs

    from tests.helpers import in_process_engine_core

    register_configs()
    where = contextlib.nullcontext() if spec.get("engine_core_process") else in_process_engine_core()
    with where:
        llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5,
                  max_model_len=8192, limit_mm_per_prompt={"image": 4}, seed=0)
    model_cls = ModelRegistry._try_load_model_cls(spec.get("architecture", "Ovis"))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    results = []
    for case in spec["cases"]:
        images = [Image.open(p) for p in case["images"]]
        request = {"prompt": case["prompt"], "mm_processor_kwargs": case.get("mm_kwargs", {})}
        if images:
            request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        try:
            [out] = llm.generate([request], params, use_tqdm=False)
        except Exception as exc:  # the built-in's failure is the result being recorded
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        ids = list(out.prompt_token_ids)
        results.append({"prompt_token_ids": ids,
                        "prompt_logprobs": [None] + [out.prompt_logprobs[i][ids[i]].logprob
                                                     for i in range(1, len(ids))]})
    llm.llm_engine.engine_core.shutdown()
    return {"model_class": f"{model_cls.__module__}.{model_cls.__name__}", "results": results}


def main(spec_path: str, out_path: str) -> None:
    outs = [run_model(spec) for spec in json.load(open(spec_path))]
    with open(out_path, "w") as f:
        json.dump(outs, f)
    # vLLM's CPU teardown sometimes aborts at interpreter exit ("terminate called without an
    # active exception"): the engines are stopped explicitly above; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
