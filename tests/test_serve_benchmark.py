"""A seconds-long version of benchmarks/serve.py, so the benchmark never rots (no timing asserted)."""

import json

from benchmarks import serve


def test_serve_benchmark_smoke(tiny_checkpoint, tmp_path):
    result = serve.main(["--model", str(tiny_checkpoint), "--server", "both", "--concurrency", "2",
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
    assert result["machine"]["cpus"] > 0 and "benchmarks.serve" in result["command"]

    # The chart again from the saved JSON, nothing run; the tables as RESULTS.md shows them.
    (tmp_path / "serve.png").unlink()
    assert serve.main(["--replot", str(tmp_path / "serve.json")]) == json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.png").exists()
    tables = serve.markdown_tables(result)
    assert "| ours | 2 |" in tables and "| built-in | 2 |" in tables and "| 2 | " in tables.split("verdict")[1]
