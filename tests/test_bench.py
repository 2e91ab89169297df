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
    assert {row["algorithm"].split()[0] for row in flow} == {"farneback", "dis", "tvl1", "tvl1_torch", "raft"}
    for row in flow:
        assert row["verdict"] in ("pass", "FAIL") and row["ratio"] > 0
        if not row["algorithm"].startswith("raft"):  # RAFT runs with random weights here: speed only
            assert row["epe_object"] < row["epe_zero_flow"]  # the flow it timed is also right
    torch_tvl1 = next(row for row in flow if row["algorithm"].startswith("tvl1_torch"))
    assert torch_tvl1["vs_opencv_tvl1"] > 0 and set(torch_tvl1["rates"]) == {"bare", "pipeline", "opencv_tvl1"}
    storage = result["parts"]["storage"]["rows"][0]
    assert storage["verdict"] in ("pass", "FAIL") and storage["rates"]["merged_hdf5"]["median"] > 0
    text = (out / "bench.md").read_text()
    assert "## Optical flow" in text and "## Feature storage" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hpcvid-bench-")]  # scratch removed


@pytest.mark.slow
def test_scaling_part_runs_both_ways_and_keeps_the_other_parts(tmp_path, monkeypatch) -> None:
    from hpcvid.cli import bench

    monkeypatch.setitem(bench.SIZES, "scaling_per_class", (2, 8))  # 12 clips of 8 frames: structure, not speed
    monkeypatch.setitem(bench.SIZES, "scaling_frames", (8, 32))
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"date": "earlier", "commit": "abc", "repeats": 5,
                                                "parts": {"storage": {"rows": [], "target": 20.0, "what": "kept"}}}))
    code = main(["bench", "--quick", "--repeats", "1", "--only", "scaling", "--out", str(out),
                 "--scratch", str(tmp_path)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result["parts"]) == {"scaling", "storage"} and result["kept_from_previous_runs"] == ["storage"]
    row = result["parts"]["scaling"]["rows"][0]
    assert row["workers"] == 2 and row["videos"] == 12
    assert row["identical_contents"] is True  # 1 shard on 1 worker stored what 2 shards on 2 workers stored
    measured = row["seconds"]  # the structure of what was recorded; never how fast it was
    assert set(measured) == {"startup", "single", "parallel", "single_latency", "parallel_latency",
                             "single_busy", "parallel_busy"}
    assert all(len(v["samples"]) == 1 and v["median"] == v["samples"][0] for v in measured.values())  # one repeat
    assert row["verdict"] in ("pass", "machine", "FAIL") and row["ratio"] > 0 and row["ratio_raw"] > 0
    assert "## Scaling" in (out / "bench.md").read_text()
    assert "scaling" not in result["not_measured"]


def test_gpu_flow_part_measures_every_setting_and_renders(tmp_path, one_torch_thread) -> None:
    """The GPU part's code, run on the CPU at a toy size (a GPU session runs it for real: `--only flow_gpu`)."""
    from hpcvid.cli import bench

    part = bench.bench_flow_gpu(tmp_path, quick=True, repeats=1, device="cpu", sizes=((32, 48),),
                                batches=(1, 2), compile_options=(False,))
    rows = part["rows"]
    assert [(r["params"].split()[0], r["batch"]) for r in rows] == [("reduced:", 1), ("reduced:", 2),
                                                                   ("OpenCV", 1), ("OpenCV", 2)]
    for row in rows:
        assert row["size"] == "48x32" and row["compile"] is False and row["ratio"] > 0
        assert set(row["rates"]) == {"tvl1_torch", "opencv_one_core"} and row["verdict"] in ("pass", "FAIL")
    title, columns, cells = bench.TABLES["flow_gpu"]
    assert len(cells(rows[0])) == len(columns) and "100x" in title.format(target=part["target"])


def test_gpu_flow_part_is_refused_without_a_gpu_before_anything_runs(tmp_path, capsys) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert main(["bench", "--only", "flow,flow_gpu", "--out", str(tmp_path / "out")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stall_part_trains_every_model_and_times_the_bare_loop(tmp_path, monkeypatch, one_torch_thread) -> None:
    """The stall part's plumbing at a toy size (6 classes x 3 clips of 8 frames at 32 px, 2 epochs, one
    variant): a row per model kind with both rates and the per-epoch figures; never how fast they were."""
    from hpcvid.cli import bench
    from hpcvid.learn.kinds import KINDS

    monkeypatch.setitem(bench.SIZES, "stall_per_class", (3, 3))
    monkeypatch.setitem(bench.SIZES, "stall_frames", 8)
    monkeypatch.setitem(bench.SIZES, "stall_side", 32)
    monkeypatch.setattr(bench, "STALL_VARIANTS", {"workers=0, no cache": {"train.workers": 0, "train.cache_gb": 0.0}})
    monkeypatch.setitem(bench.STALL_TRAIN, "train.batch_size", 4)
    part = bench.bench_stall(tmp_path, quick=True, repeats=1)
    rows = part["rows"]
    assert [(r["model"], r["setting"]) for r in rows] == [*((m, "default") for m in KINDS),
                                                          ("flow", "workers=0, no cache")]
    for row in rows:
        assert row["epochs"] == 2 and len(row["per_epoch"]["bare_per_s"]) == 2
        assert row["samples_per_s"] > 0 and row["bare_per_s"] > 0 and row["ratio"] > 0 and row["input_ms"] > 0
        assert 0 <= row["median_stall"] <= 1 and row["verdict"] in ("pass", "machine", "FAIL")
        # beside the input work whenever workers do it; with none, the training process does it itself
        assert len(row["per_epoch"]["bare_beside_input_per_s"]) == (2 if row["workers"] else 0)
        assert (row["bare_beside_input_per_s"] is None) == (row["workers"] == 0)
    assert all(r["workers"] >= 1 for r in rows[:-1])                         # the default: workers
    # the cache serves every kind with its default settings: the batched datasets and those read item by item
    # (TSN, C3D and the CNN-LSTM), whose sources are the same
    assert {r["model"] for r in rows[:-1] if r["cached"]} == set(KINDS)
    assert rows[-1]["workers"] == 0 and not rows[-1]["cached"] and rows[-1]["prepared"] == "in this process"
    title, columns, cells = bench.TABLES["stall"]
    assert all(len(cells(r)) == len(columns) for r in rows)


@pytest.mark.slow
def test_memory_and_parallel_parts_extract_for_real_into_folders_that_did_not_exist(tmp_path, monkeypatch) -> None:
    from hpcvid.cli import bench

    monkeypatch.setitem(bench.MEMORY_FRAMES, True, (20, 40, 60))      # structure, not the 30,000-frame clip
    monkeypatch.setitem(bench.PARALLEL_CLIPS, True, (2, 12))
    monkeypatch.setitem(bench.MEMORY_SETTINGS, "size", 64)
    monkeypatch.setitem(bench.PARALLEL_SETTINGS, "size", 64)
    out, scratch = tmp_path / "new" / "bench", tmp_path / "new" / "scratch"   # neither exists yet
    code = main(["bench", "--quick", "--repeats", "1", "--only", "memory,parallel", "--out", str(out),
                 "--scratch", str(scratch)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    memory = result["parts"]["memory"]
    assert [row["frames"] for row in memory["rows"]] == [20, 40, 60]
    assert [row["kept"] for row in memory["rows"]] == [20, 40, 60]             # every frame extracted
    assert all(row["peak_rss_mb"] > 50 for row in memory["rows"])               # the child's own peak, read
    assert memory["ratio"] == pytest.approx(memory["rows"][-1]["peak_rss_mb"] / memory["rows"][0]["peak_rss_mb"],
                                            abs=1e-3)
    parallel = result["parts"]["parallel"]["rows"][0]
    assert parallel["identical_contents"] is True and parallel["frames"] == 24   # 1 core and 2 cores stored the same
    assert set(parallel["rates"]) == {"1 core", "2 cores, 1 worker", "2 cores, threads only", "2 x 1 core at once"}
    assert parallel["machine_limit"] > 0 and parallel["verdict"] in ("pass", "machine", "FAIL")
    text = (out / "bench.md").read_text()
    assert "## Memory" in text and "## Parallel" in text
    assert scratch.is_dir() and not list(scratch.iterdir())                     # created, and left clean


def _stall_run(trainer: list[float], bare: list[float], beside: list[float], stall: float = 0.03) -> dict:
    return {"inputs": {"workers": 1, "threads": 1, "cached": False, "gb": 0.0, "prepared": "in the DataLoader workers"},
            "device": "cpu", "train_samples": 480, "stall": [0.3] + [stall] * (len(trainer) - 1),
            "samples_per_s": trainer, "bare_per_s": bare, "bare_beside_input_per_s": beside,
            "input_ms_per_batch": [10.0] * len(trainer)}


def test_stall_rates_weigh_each_epoch_by_its_seconds_and_the_verdict_names_the_machine() -> None:
    """Rates over the steady epochs are samples over seconds (one slow epoch weighs what it lasted, the cold
    first epoch not at all); a trainer within 0.9 of the bare loop beside the input work but not of the bare
    loop alone is the machine's share, a long stall is a failure whatever the rates."""
    from types import SimpleNamespace

    from hpcvid.cli import bench

    config = SimpleNamespace(train=SimpleNamespace(backbone="small", batch_size=16))
    row = bench.stall_row("flow", config, _stall_run([10.0, 300.0, 100.0], [1.0, 300.0, 300.0], [1.0, 200.0, 200.0]))
    assert row["samples_per_s"] == 150.0 and row["bare_per_s"] == 300.0       # 2 x 480 / (1.6 + 4.8) s
    assert row["ratio"] == 0.5 and row["machine_share"] == 0.333 and row["beside_ratio"] == 0.75
    assert row["verdict"] == "FAIL" and row["bare_spread"] == 1.0

    machine = bench.stall_row("flow", config, _stall_run([1.0, 200.0, 200.0], [1.0, 300.0, 300.0], [1.0, 210.0, 210.0]))
    assert machine["ratio"] < 0.9 <= machine["beside_ratio"] and machine["verdict"] == "machine"
    passing = bench.stall_row("flow", config, _stall_run([1.0, 290.0, 290.0], [1.0, 300.0, 300.0], [1.0, 290.0, 290.0]))
    assert passing["verdict"] == "pass"
    stalled = bench.stall_row("flow", config, _stall_run([1.0, 290.0, 290.0], [1.0, 300.0, 300.0], [1.0, 290.0, 290.0],
                                                         stall=0.08))
    assert stalled["verdict"] == "FAIL"
    title, columns, cells = bench.TABLES["stall"]
    assert len(cells(machine)) == len(columns) and "33%" in " ".join(cells(row))


def test_a_machine_verdict_needs_the_measurement_that_takes_the_machine_out() -> None:
    """Decode: a wall ratio that fails with a CPU-time ratio that passes is the machine, both failing is the
    code. Scaling: the per-video work within the target once the slowdown of S videos at once is taken out."""
    from hpcvid.cli import bench

    assert bench.machine_verdict(0.95, 0.5, 0.9) == "pass"
    assert bench.machine_verdict(0.75, 1.2, 0.9) == "machine"
    assert bench.machine_verdict(0.75, 0.85, 0.9) == "FAIL"
    assert bench.scaling_verdict(1.10, 1.10, 1.3) == "pass"
    assert bench.scaling_verdict(1.77, 1.18, 1.16) == "machine"     # 1.18 / 1.16 = 1.02
    assert bench.scaling_verdict(1.77, 1.40, 1.16) == "FAIL"        # 1.21: more than the machine explains
    assert bench.parallel_verdict(1.62, 1.7) == "pass"
    assert bench.parallel_verdict(1.45, 1.8) == "machine"          # 81 % of what two cores give here
    assert bench.parallel_verdict(1.31, 1.8) == "FAIL"             # 73 %
