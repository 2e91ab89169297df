"""Walltimes and shard counts from rates: the arithmetic on literal numbers, the verb, and submit's use of it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcvid.launch.planning import (MARGIN, MARGIN_S, Rates, format_walltime, make_plan, shard_loads, shards_for,
                                    with_margin)

RATES = Rates(frames_per_s=100.0, per_video_s=1.0, startup_s=20.0, videos=3)


def test_shard_loads_follow_the_extraction_s_dealing_of_videos():
    frames = {"a": 1000, "b": 2000, "c": 3000, "d": 4000, "e": 5000}
    loads = shard_loads(frames, 2, RATES)
    # sorted ids dealt round robin: shard 0 = a, c, e; shard 1 = b, d
    assert [(load.videos, load.frames) for load in loads] == [(3, 9000), (2, 6000)]
    assert loads[0].seconds == pytest.approx(20 + 3 * 1.0 + 9000 / 100)
    assert loads[1].seconds == pytest.approx(20 + 2 * 1.0 + 6000 / 100)


def test_the_walltime_adds_the_margin_and_rounds_up_to_five_minutes():
    assert MARGIN == 0.25 and MARGIN_S == 300
    assert with_margin(113.0) == 600.0           # 113 x 1.25 + 300 = 441.25 -> 600
    assert with_margin(960.0) == 1500.0          # 960 x 1.25 + 300 = 1500 exactly
    assert format_walltime(600) == "00:10:00" and format_walltime(90061) == "1-01:01:01"


def test_the_shard_count_that_fits_a_target_is_the_smallest_one():
    frames = {f"v{i:03d}": 500 for i in range(100)}            # 100 videos of 500 kept frames, 6 s each
    plan = make_plan(frames, 4, RATES, target_s=900)
    assert plan.largest.videos == 25 and plan.walltime_s == with_margin(20 + 25 * 6)
    fits = shards_for(frames, RATES, 900)
    assert fits == 2 and plan.fits == 2          # 50 videos: 320 s -> 700 s -> 900 s; 100 videos: too long
    assert with_margin(max(load.seconds for load in shard_loads(frames, 1, RATES))) > 900
    assert shards_for({"huge": 10 ** 7}, RATES, 3600) is None    # one video alone is longer than the target


def _tiny_job(tmp_path: Path, dataset: Path, work: Path) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f'work = "{work}"\n[dataset]\nroot = "{dataset}"\nformat = "ucf101"\n'
                   '[extract]\nshards = 3\nsize = 32\nbackbone = "none"\nflow = "farneback"\n')
    return job


def slow_rates(config) -> Rates:
    """1 kept frame per second: the tiny set's largest shard (8 videos x 12 frames) is predicted at 126 s."""
    from hpcvid.stages.extract import settings_digest

    return Rates(frames_per_s=1.0, per_video_s=0.0, startup_s=30.0, settings=settings_digest(config), videos=3)


def test_plan_prints_shards_and_the_recommended_walltime(tiny_synthetic, tmp_path, capsys):
    from hpcvid.cli import main
    from hpcvid.config import resolve_config
    from hpcvid.workfolder import WorkFolder

    work = tmp_path / "work"
    job = _tiny_job(tmp_path, tiny_synthetic, work)
    assert main(["index", "--config", str(job)]) == 0
    config = resolve_config(job)
    WorkFolder(work).rates.write_text(json.dumps(slow_rates(config).to_dict()))
    capsys.readouterr()
    assert main(["plan", "--config", str(job), "--target", "00:10:00"]) == 0
    out = capsys.readouterr().out
    assert "plan: 24 videos, 288 kept frames in 3 shard(s)" in out
    assert "largest shard: 8 videos, 96 frames, predicted 00:02:06" in out
    assert "recommended --walltime 00:10:00" in out and "2 shard(s) fit a walltime of 00:10:00" in out


@pytest.mark.slow
def test_plan_calibrates_on_the_dataset_s_own_videos(tiny_synthetic, tmp_path, capsys):
    from hpcvid.cli import main
    from hpcvid.workfolder import WorkFolder

    job = _tiny_job(tmp_path, tiny_synthetic, tmp_path / "work")
    assert main(["plan", "--config", str(job)]) == 0
    rates = json.loads(WorkFolder(tmp_path / "work").rates.read_text())
    assert rates["videos"] == 3 and rates["frames_per_s"] > 0
    assert "calibrating on 3 of the dataset's videos" in capsys.readouterr().out
    assert not (tmp_path / "work" / "extract").exists(), "the calibration extracts into a scratch folder"


def test_submit_extract_asks_for_the_predicted_walltime_and_refuses_less(tiny_synthetic, tmp_path, capsys):
    from hpcvid.cli import main
    from hpcvid.config import resolve_config
    from hpcvid.workfolder import WorkFolder

    work = tmp_path / "work"
    job = _tiny_job(tmp_path, tiny_synthetic, work)
    assert main(["index", "--config", str(job)]) == 0
    WorkFolder(work).rates.write_text(json.dumps(slow_rates(resolve_config(job)).to_dict()))
    capsys.readouterr()
    assert main(["submit", "extract", "--config", str(job), "--executor", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "extract: --walltime 00:10:00 (predicted" in out and "#SBATCH --time=10" in out
    assert main(["submit", "extract", "--config", str(job), "--executor", "slurm", "--dry-run",
                 "--walltime", "00:05:00"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "launch.walltime = 00:05:00 is below what the largest extract shard" in err
    assert main(["submit", "extract", "--config", str(job), "--executor", "slurm", "--dry-run",
                 "--walltime", "00:05:00", "--force"]) == 0
