"""Shared fixtures: one generated checkpoint and one vLLM engine per configuration per session.

A single-rank engine runs in the test process (tests/helpers.py make_llm) and starts in seconds;
a server or a multi-rank engine takes ~1 min on a 2-core CPU (each of vLLM's processes imports
it), so every test of a configuration shares one.
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
    from benchmarks.common import cpu_model
    from ovis_vllm.kernels.cpu import cpu_features

    # What the CPU paths were chosen by (kernels/cpu.py): a run says which machine it covers.
    return [f"ovis checkpoint seed: {SEED} (reproduce with OVIS_TEST_SEED={SEED})",
            f"cpu: {cpu_model()}: {cpu_features()}"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from ovis_vllm.engine.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ovis-tiny"), "tiny", seed=SEED)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from tests.ovis_reference import ReferenceOvis

    return ReferenceOvis(tiny_checkpoint)


@pytest.fixture(scope="session")
def llm(tiny_checkpoint):
    from tests.helpers import make_llm, shutdown

    engine = make_llm(tiny_checkpoint)
    yield engine
    shutdown(engine)
