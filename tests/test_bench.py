"""`hpcvid bench` runs end to end and writes a complete report (no timing is asserted: speed lives in the
committed results, never in tests)."""
from __future__ import annotations

import json

import pytest

from hpcvid.cli import main


@pytest.mark.slow
def test_quick_bench_writes_json_and_markdown(tmp_path) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--repeats", "1", "--only", "flow,storage", "--out", str(out),
                 "--scratch", str(tmp_path)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result["parts"]) == {"flow", "storage"}
    flow = result["parts"]["flow"]["rows"]
    assert {row["algorithm"].split()[0] for row in flow} == {"farneback", "dis", "tvl1"}
    for row in flow:
        assert row["verdict"] in ("pass", "FAIL") and row["ratio"] > 0
        assert row["epe_object"] < row["epe_zero_flow"]  # the flow it timed is also right
    storage = result["parts"]["storage"]["rows"][0]
    assert storage["verdict"] in ("pass", "FAIL") and storage["rates"]["merged_hdf5"]["median"] > 0
    text = (out / "bench.md").read_text()
    assert "## Optical flow" in text and "## Feature storage" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hpcvid-bench-")]  # scratch removed
