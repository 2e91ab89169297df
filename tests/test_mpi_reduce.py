"""The MPI reduce (2 ranks, real Open MPI via mpirun + mpi4py) equals the single-process file reduce."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcvid.stages.reduce import collect, reduce_files

from predictions_factory import make_manifest, write_run

pytestmark = pytest.mark.mpi

MPIRUN = shutil.which("mpirun")
# Each rank runs the user's command, `hpcvid collect WORK --out OUT`; it sees OMPI_COMM_WORLD_SIZE = 2 and
# reduces with MPI by itself (no --mpi flag), and writes what it did into a JSON file per rank.
RANK_SCRIPT = """
import contextlib, io, json, sys
from mpi4py import MPI
from hpcvid import cli
work, out = sys.argv[1], sys.argv[2]
comm = MPI.COMM_WORLD
printed, errors = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
    code = cli.main(["collect", work, "--out", out])
with open(sys.argv[3] + f"/rank-{comm.Get_rank()}.json", "w") as handle:
    json.dump({"rank": comm.Get_rank(), "size": comm.Get_size(), "code": code,
               "out": out if "report:" in printed.getvalue() else None, "error": errors.getvalue()}, handle)
"""


def _mpirun(work: Path, out: Path) -> list[dict]:
    if MPIRUN is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin)")
    pytest.importorskip("mpi4py")
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(Path(__file__).parents[1]),
               OMP_NUM_THREADS="1")
    reports = out.parent / f"{out.name}-ranks"
    reports.mkdir()
    argv = [MPIRUN, "--allow-run-as-root", "-n", "2", sys.executable, "-c", RANK_SCRIPT, str(work), str(out),
            str(reports)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(path.read_text()) for path in sorted(reports.glob("rank-*.json"))]
    assert sorted(line["rank"] for line in lines) == [0, 1] and all(line["size"] == 2 for line in lines)
    return lines


def _comparable(summary: dict) -> dict:
    summary = dict(summary)
    summary.pop("collected_at")
    return summary


def test_mpi_reduce_equals_file_reduce(tmp_path):
    work = tmp_path / "work"
    manifest = make_manifest(work, n_classes=12, test_per_class=4)
    write_run(work, manifest, "frame", "frame", {"middle": 0.3, "mean_frames": 0.4}, shards=3, seed=5)
    write_run(work, manifest, "lstm", "lstm", {"windows": 0.9, "last_step": 0.6, "mean": 0.7}, shards=4, seed=6)

    lines = _mpirun(work, tmp_path / "mpi")
    assert [line.get("out") for line in sorted(lines, key=lambda x: x["rank"])] == [str(tmp_path / "mpi"), None]
    assert all(line["code"] == 0 for line in lines)
    collect(work, tmp_path / "files")
    by_mpi = json.loads((tmp_path / "mpi" / "summary.json").read_text())
    by_files = json.loads((tmp_path / "files" / "summary.json").read_text())
    assert _comparable(by_mpi) == _comparable(by_files)
    for name in ("per_class.csv", "confusion/lstm__windows.csv", "confusion/frame__middle.csv", "improvement.csv"):
        assert (tmp_path / "mpi" / name).read_text() == (tmp_path / "files" / name).read_text()
    reduction = reduce_files(work)
    assert by_mpi["runs"]["lstm"]["strategies"]["windows"]["correct"] == int(
        np.trace(reduction.runs["lstm"].confusion["windows"]))


def test_mpi_reduce_names_a_video_counted_on_two_ranks(tmp_path):
    work = tmp_path / "work"
    manifest = make_manifest(work)
    write_run(work, manifest, "lstm", "lstm", {"windows": 0.9}, shards=2)
    # shard 1 (counted by rank 1) also holds a video of shard 0 (counted by rank 0)
    from hpcvid.storage.predictions import read_prediction_shard
    from hpcvid.workfolder import Unit, WorkFolder
    from predictions_factory import write_shard

    folder = work / "eval" / "lstm"
    first, second = (read_prediction_shard(folder / f"pred-000{i}-of-0002.h5") for i in range(2))
    second.video_ids.append(first.video_ids[0])
    second.labels = np.append(second.labels, first.labels[0])
    second.scores = {s: np.vstack([second.scores[s], first.scores[s][:1]]) for s in second.strategies}
    second.splits = None
    write_shard(work, second, WorkFolder(work).current_set(Unit("eval", "lstm")).id)
    lines = _mpirun(work, tmp_path / "mpi")
    for line in lines:   # every rank reports the same error and exit code
        assert f"video {first.video_ids[0]} of run lstm was counted twice" in line["error"]
        assert line["code"] == 2
    assert not (tmp_path / "mpi" / "summary.json").exists()
