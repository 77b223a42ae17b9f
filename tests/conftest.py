"""Shared fixtures: one generated checkpoint and one vLLM engine per configuration per session.

Engines take ~20 s to start on a 2-core CPU, so every test of a configuration shares one.
The checkpoint seed is fresh each run (printed, and fixed with OVIS_TEST_SEED=N to reproduce).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

SEED = int(os.environ.get("OVIS_TEST_SEED", random.randrange(1 << 30)))


def pytest_report_header(config):
    return f"ovis checkpoint seed: {SEED} (reproduce with OVIS_TEST_SEED={SEED})"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from engine.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ovis-tiny"), "tiny", seed=SEED)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from tests.ovis_reference import ReferenceOvis

    return ReferenceOvis(tiny_checkpoint)


def make_llm(model, **kwargs):
    from vllm import LLM

    # LLM.apply_model() pickles a test's function to the workers; tests only.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    args = dict(model=str(model), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5,
                max_model_len=8192, max_num_seqs=32, limit_mm_per_prompt={"image": 4}, seed=0,
                enable_prefix_caching=True)
    args.update(kwargs)
    return LLM(**args)


@pytest.fixture(scope="session")
def llm(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint)
    yield engine
    engine.llm_engine.engine_core.shutdown()
