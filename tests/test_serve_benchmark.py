"""A seconds-long version of benchmarks/serve.py, so the benchmark never rots (no timing asserted)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_benchmark_smoke(tiny_checkpoint, tmp_path):
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--model", str(tiny_checkpoint), "--server", "both", "--concurrency", "2",
                         "--requests", "3", "--repeats", "1", "--server-args", "--dtype float32",
                         "--out", str(tmp_path)])
    assert {r["server"] for r in result["rows"]} == {"ours", "builtin"}
    for row in result["rows"]:
        assert row["errors"] == 0 and row["completed"] == 3, row["first_error"]
        assert row["requests_per_s"] > 0 and row["peak_rss_MiB"] > 0
    (ratio,) = result["ratios"]
    assert ratio["concurrency"] == 2 and ratio["verdict"] in {"ahead", "at par", "behind"}
    assert ratio["pair_min"] <= ratio["requests_per_s"] * 1.0001 and ratio["peak_rss"] > 0
    assert (tmp_path / "serve.json").exists() and (tmp_path / "serve.png").exists()
