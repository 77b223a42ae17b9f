"""benchmarks/image_costs.py once, so it never rots (no timing asserted); it also checks, at real
photo, screenshot and greyscale-scan sizes, that our decode + preprocess gives the built-in's
pixels (the built-in converts a greyscale scan to RGB before resizing; ours resizes one band)."""

from benchmarks import image_costs


def test_image_costs_run(tmp_path):
    result = image_costs.main(["--rounds", "1", "--out", str(tmp_path)])
    assert len(result["rows"]) == 3
    for row in result["rows"]:
        assert row["same_pixels"], row
        assert min(row["ours_ms"], row["built-in_ms"], row["floor_ms"]) > 0
    assert (tmp_path / "image_costs.json").exists()
