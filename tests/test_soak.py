"""A 20-second run of benchmarks/soak.py, so the soak never rots: its own pass criteria
(good_wrong, http_5xx and lost all 0, the server idle at the end) hold, and every kind of
request in the mix was sent; memory is reported per server process."""

from benchmarks import soak


def test_short_soak(tiny_checkpoint, tmp_path):
    result = soak.main(["--model", str(tiny_checkpoint), "--minutes", "0.33", "--concurrency", "8",
                        "--out", str(tmp_path)])
    c = result["counts"]
    assert result["passed"], (c, result["failures"], result["left_running"])
    assert min(c["good_ok"], c["bad_4xx"], c["disconnects"], c["cancels"]) > 0, c
    assert {"server.py", "VLLM::EngineCore"} <= set(result["server_rss_MiB"]["drift_by_process"])
    assert (tmp_path / "soak.json").exists()
