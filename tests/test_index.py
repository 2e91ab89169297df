"""Indexing: split parsers on literal text (real naming), every error case, and real videos end to end."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpcvid.cli import main as cli_main
from hpcvid.config import load_resolved, resolve_config
from hpcvid.errors import DatasetError
from hpcvid.stages.index import (
    build_manifest,
    index_dataset,
    parse_class_index,
    parse_hmdb51_file,
    parse_ucf101_list,
    read_folders,
    stable_fraction,
)
from hpcvid.storage.manifest import load_manifest
from hpcvid.media.probe import probe_video

CLASS_IND = "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 Archery\r\n"
TRAINLIST = (
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
    "ApplyLipstick/v_ApplyLipstick_g08_c02.avi 2\r\n"
    "Archery/v_Archery_g09_c03.avi 3\r\n"
)
TESTLIST = "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nArchery/v_Archery_g01_c05.avi\r\n"
HMDB_BRUSH = (
    "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
    "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \n"
    "Aussie_Brunette_Brushing_Long_Hair_brush_hair_u_nm_np1_ba_med_3.avi 0 \n"
)


# ------------------------------------------------------------------------------- parsers, literal text
def test_class_index_parses_real_naming_with_crlf():
    assert parse_class_index(CLASS_IND, "classInd.txt") == ("ApplyEyeMakeup", "ApplyLipstick", "Archery")


@pytest.mark.parametrize("text, fragment", [
    ("1 A\n3 B\n", "classInd.txt:2: class index 3 out of order"),
    ("1 A\n2 A\n", "classInd.txt:2: class 'A' is listed twice"),
    ("1 A B\n", "classInd.txt:1: expected 'INDEX ClassName'"),
    ("\n\n", "classInd.txt: lists no classes"),
])
def test_class_index_errors_name_file_and_line(text, fragment):
    with pytest.raises(DatasetError, match=fragment.replace("(", r"\(")):
        parse_class_index(text, "classInd.txt")


def test_ucf101_train_and_test_lists():
    classes = parse_class_index(CLASS_IND, "classInd.txt")
    train = parse_ucf101_list(TRAINLIST, "trainlist01.txt", classes, "train")
    test = parse_ucf101_list(TESTLIST, "testlist01.txt", classes, "test")
    assert [e.id for e in train] == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "ApplyLipstick/v_ApplyLipstick_g08_c02",
                                     "Archery/v_Archery_g09_c03"]
    assert [e.class_name for e in test] == ["ApplyEyeMakeup", "Archery"]
    assert {e.split for e in train} == {"train"} and {e.split for e in test} == {"test"}
    assert test[1].source == "testlist01.txt:2"


def test_ucf101_class_not_in_class_index_names_file_and_line():
    classes = parse_class_index(CLASS_IND, "classInd.txt")
    text = TRAINLIST + "YoYo/v_YoYo_g01_c01.avi 101\n"
    with pytest.raises(DatasetError, match=r"trainlist01.txt:4: class 'YoYo' is not in classInd.txt"):
        parse_ucf101_list(text, "trainlist01.txt", classes, "train")


def test_ucf101_wrong_class_number_and_malformed_line():
    classes = parse_class_index(CLASS_IND, "classInd.txt")
    with pytest.raises(DatasetError, match=r"trainlist01.txt:1: class number 3 disagrees"):
        parse_ucf101_list("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 3\n", "trainlist01.txt", classes, "train")
    with pytest.raises(DatasetError, match=r"testlist01.txt:1: expected 'Class/video.avi'"):
        parse_ucf101_list("v_ApplyEyeMakeup_g08_c01.avi\n", "testlist01.txt", classes, "test")


def test_hmdb51_codes_map_to_splits():
    entries = parse_hmdb51_file(HMDB_BRUSH, "brush_hair_test_split1.txt", "brush_hair")
    assert [e.split for e in entries] == ["train", "test", "unused"]
    assert entries[0].id == "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0"
    assert entries[2].source == "brush_hair_test_split1.txt:3"


def test_hmdb51_bad_code_names_file_and_line():
    with pytest.raises(DatasetError, match=r"brush_hair_test_split1.txt:2: expected 'video.avi CODE'"):
        parse_hmdb51_file("a.avi 1\nb.avi 3\n", "brush_hair_test_split1.txt", "brush_hair")


def test_stable_fraction_is_fixed_by_the_id():
    # sha256-based: the same on every machine and Python run. Golden values, computed once: Python's salted
    # built-in hash (or any other function) gives other numbers, and a split that changes between runs.
    assert stable_fraction("walk/clip_001") == 0.9008651526818242
    assert stable_fraction("c/v0") == 0.7889305650296027
    values = [stable_fraction(f"c/v{i}") for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(v < 0.5 for v in values) / len(values) < 0.55


# ----------------------------------------------------------------------------- datasets on disk
def _config(root: Path, work: Path, **dataset):
    overrides = {"work": str(work), "dataset.root": str(root), **{f"dataset.{k}": v for k, v in dataset.items()}}
    return resolve_config(overrides=overrides)


def _ucf_copy(tiny_synthetic: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ucf"
    shutil.copytree(tiny_synthetic, root)
    return root


def test_synthetic_dataset_indexes_with_probed_videos(tiny_work, tiny_synthetic):
    manifest = load_manifest(tiny_work)
    assert manifest.classes[0] == "TriangleExpand" and len(manifest.classes) == 6
    assert (len(manifest.by_split("train")), len(manifest.by_split("test"))) == (18, 6)
    entry = manifest.videos[0]
    assert entry.id == "TriangleExpand/v_TriangleExpand_g01_c02"  # c01 is split 1's test clip
    assert entry.path == entry.id + ".avi"            # relative to the dataset root: the dataset may move
    assert manifest.dataset["root"] == str(tiny_synthetic.resolve())
    assert (entry.frames, entry.width, entry.height, entry.fps) == (12, 48, 48, 25.0)
    assert entry.size == (tiny_synthetic / entry.path).stat().st_size and entry.probe_error is None
    assert load_resolved(tiny_work).dataset.root == str(tiny_synthetic)


def test_missing_listed_video_is_a_warning_naming_split_file_and_line(tiny_synthetic, tmp_path):
    root = _ucf_copy(tiny_synthetic, tmp_path)
    (root / "TriangleExpand" / "v_TriangleExpand_g01_c02.avi").unlink()
    manifest = build_manifest(_config(root, tmp_path / "w"))
    assert len(manifest.videos) == 23
    assert any("trainlist01.txt:1:" in w and "v_TriangleExpand_g01_c02.avi" in w for w in manifest.warnings)


def test_unreadable_video_stays_with_probe_error(tiny_synthetic, tmp_path):
    root = _ucf_copy(tiny_synthetic, tmp_path)
    broken = root / "BarExpand" / "v_BarExpand_g01_c03.avi"
    broken.write_bytes(b"this is not a video" * 10)
    manifest = index_dataset(_config(root, tmp_path / "w"))
    entry = next(v for v in manifest.videos if v.id == "BarExpand/v_BarExpand_g01_c03")
    assert entry.frames is None and str(broken) in entry.probe_error
    assert any("unreadable video" in w and str(broken) in w for w in manifest.warnings)
    assert load_manifest(tmp_path / "w").videos == manifest.videos


def test_duplicate_id_is_fatal(tiny_synthetic, tmp_path):
    root = _ucf_copy(tiny_synthetic, tmp_path)
    with open(root / "testlist01.txt", "a") as handle:
        handle.write("TriangleExpand/v_TriangleExpand_g01_c02.avi\n")  # already in trainlist01
    with pytest.raises(DatasetError, match=r"testlist01.txt:7: duplicate video id 'TriangleExpand/v_TriangleExpand_g01_c02'"
                                           r" \(also at .*trainlist01.txt:1\)"):
        build_manifest(_config(root, tmp_path / "w"))


def test_missing_split_file_says_which_file_where(tiny_synthetic, tmp_path):
    root = _ucf_copy(tiny_synthetic, tmp_path)
    (root / "testlist01.txt").unlink()
    with pytest.raises(DatasetError, match=rf"expected testlist01.txt in {root}"):
        build_manifest(_config(root, tmp_path / "w"))
    with pytest.raises(DatasetError, match=r"expected <class>_test_split1.txt files in"):
        build_manifest(_config(root, tmp_path / "w", format="hmdb51"))


def test_empty_dataset_is_fatal(tiny_synthetic, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    for name in ("classInd.txt", "trainlist01.txt", "testlist01.txt"):
        shutil.copy(tiny_synthetic / name, root / name)
    with pytest.raises(DatasetError, match="empty dataset"):
        build_manifest(_config(root, tmp_path / "w"))
    with pytest.raises(DatasetError, match="empty dataset"):
        build_manifest(_config(root, tmp_path / "w", format="folders"))


def test_hmdb51_layout_with_splits_dir(tiny_synthetic, tmp_path):
    root, splits = tmp_path / "hmdb", tmp_path / "testTrainMulti_7030_splits"
    sources = sorted((tiny_synthetic / "BarExpand").glob("*.avi"))
    for cls in ("climb_stairs", "climb"):  # file names sort the other way round than class names
        (root / cls).mkdir(parents=True)
        names = [f"April_09_{cls}_u_nm_np1_ba_goo_{i}.avi" for i in range(3)]
        for name, source in zip(names, sources):
            shutil.copy(source, root / cls / name)
        splits.mkdir(exist_ok=True)
        (splits / f"{cls}_test_split1.txt").write_text(f"{names[0]} 1 \n{names[1]} 2 \n{names[2]} 0 \n")
    manifest = index_dataset(_config(root, tmp_path / "w", format="hmdb51", splits_dir=str(splits)))
    assert manifest.classes == ("climb", "climb_stairs")
    assert [(v.class_name, v.split, v.label) for v in manifest.videos][:4] == [
        ("climb", "train", 0), ("climb", "test", 0), ("climb", "unused", 0), ("climb_stairs", "train", 1)]
    assert manifest.videos[3].id == "climb_stairs/April_09_climb_stairs_u_nm_np1_ba_goo_0"
    assert all(v.frames == 12 for v in manifest.videos)


def test_folders_layout_generates_a_stable_split(tiny_synthetic, tmp_path):
    root = tmp_path / "folders"
    for cls in ("jump", "walk"):
        (root / cls / "day1").mkdir(parents=True)
        for i, source in enumerate(sorted((tiny_synthetic / "BarRotateLeft").glob("*.avi"))):
            shutil.copy(source, root / cls / "day1" / f"clip{i}.avi")
    (root / "walk" / "notes.txt").write_text("not a video")
    (root / "loose.avi").write_bytes(b"")
    parsed, warnings = read_folders(root, (".avi",), 0.5)
    assert parsed.classes == ("jump", "walk") and len(parsed.entries) == 8
    assert [e.id for e in parsed.entries][:2] == ["jump/day1/clip0", "jump/day1/clip1"]
    for entry in parsed.entries:
        assert entry.split == ("test" if stable_fraction(entry.id) < 0.5 else "train")
    assert "loose.avi" in warnings[0]
    manifest = build_manifest(_config(root, tmp_path / "w", format="folders", test_fraction=0.5))
    assert [v.split for v in manifest.videos] == [e.split for e in parsed.entries]


def test_probe_counts_frames_by_decoding_when_asked(tiny_synthetic):
    video = next((tiny_synthetic / "TriangleContract").glob("*.avi"))
    header, decoded = probe_video(video), probe_video(video, exact=True)
    assert (header.frames, header.counted) == (12, False)
    assert (decoded.frames, decoded.counted) == (12, True)


def test_probe_counts_by_decoding_when_the_container_has_no_count(tiny_synthetic, tmp_path):
    from hpcvid.launch.external import run_command
    import imageio_ffmpeg

    source = next((tiny_synthetic / "BarContract").glob("*.avi"))
    mkv = tmp_path / "clip.mkv"
    run_command([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(source), "-c", "copy", str(mkv)])
    info = probe_video(mkv)
    assert info.counted and info.frames == 12 and (info.width, info.height) == (48, 48)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_index_end_to_end(tiny_synthetic, tmp_path, capsys):
    work = tmp_path / "work"
    code = cli_main(["index", "--dataset", str(tiny_synthetic), "--format", "ucf101", "--split", "2",
                     "--work", str(work)])
    assert code == 0
    assert "6 classes, 18 train / 6 test / 0 unused" in capsys.readouterr().out
    manifest = load_manifest(work)
    assert manifest.dataset["split"] == 2
    # Split 2 moves the test block: clip c02 is a test clip there.
    assert {v.id.rsplit("_", 1)[1] for v in manifest.by_split("test")} == {"c02"}


def test_cli_index_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code = cli_main(["index", "--dataset", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nowhere is not a folder" in err


def test_probe_errors_are_one_line_naming_the_file(tmp_path):
    from hpcvid.launch.external import run_command
    from hpcvid.errors import VideoError
    import imageio_ffmpeg

    audio = tmp_path / "sound.mkv"
    run_command([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2", str(audio)])
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"RIFF" + bytes(200))
    for path, reason in ((audio, "has no video stream"), (garbage, "cannot be read as a video"),
                         (tmp_path / "gone.avi", "no such file")):
        with pytest.raises(VideoError) as error:
            probe_video(path)
        assert str(error.value).startswith(f"{path}: {reason}") and "\n" not in str(error.value)


def test_ucf101_class_is_the_folder_not_the_file_name():
    # Real UCF-101: the folder and classInd say HandstandPushups, the files say HandStandPushups.
    classes = parse_class_index("1 HandstandPushups\n", "classInd.txt")
    entries = parse_ucf101_list("HandstandPushups/v_HandStandPushups_g08_c01.avi 1\r\n", "trainlist01.txt",
                                classes, "train")
    assert (entries[0].class_name, entries[0].id) == ("HandstandPushups", "HandstandPushups/v_HandStandPushups_g08_c01")


# ----------------------------------------------------------------------------- confinement
def test_confine_on_literal_entries(tmp_path):
    from hpcvid.stages.index import confine

    root = tmp_path / "root"
    (root / "A").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "A" / "inside_link").symlink_to(root / "A")
    (root / "A" / "escape").symlink_to(tmp_path / "outside")
    assert confine(root, "A/x.avi") == (root / "A" / "x.avi", "")
    assert confine(root, "/etc/hostname")[1] == "is an absolute path"
    assert "'..'" in confine(root, "A/../../outside/x.avi")[1]
    assert confine(root, "A/inside_link/x.avi")[0] == root / "A" / "inside_link" / "x.avi"
    assert "points outside the dataset root" in confine(root, "A/escape/x.avi")[1]
    assert confine(root, "A/escape/x.avi", "all")[0] == root / "A" / "escape" / "x.avi"
    assert "follow_symlinks = 'none'" in confine(root, "A/inside_link/x.avi", "none")[1]


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.avi"
    secret.parent.mkdir()
    secret.write_bytes(b"not for hpcvid")
    return secret


def test_entries_that_leave_the_root_are_refused_and_never_opened(tiny_synthetic, tmp_path, monkeypatch):
    """ucf101, hmdb51 and folders: traversal, absolute paths and escaping links are warnings, never probed."""
    from hpcvid.media import probe
    from hpcvid.stages import index

    secret = _secret(tmp_path)
    probed: list[Path] = []
    real_probe = probe.probe_video
    monkeypatch.setattr(probe, "probe_video", lambda path, **kw: probed.append(Path(path)) or real_probe(path, **kw))

    root = _ucf_copy(tiny_synthetic, tmp_path)
    (root / "TriangleExpand" / "linked.avi").symlink_to(secret)
    with open(root / "trainlist01.txt", "a") as listing:
        listing.write("TriangleExpand/../../outside/secret.avi 1\nTriangleExpand/linked.avi 1\n")
    with open(root / "testlist01.txt", "a") as listing:
        listing.write(f"{secret}\n")
    manifest = index.build_manifest(_config(root, tmp_path / "w"))
    refused = [w for w in manifest.warnings if "refused" in w]
    assert len(refused) == 3 and all("not opened" in w for w in refused)
    assert any("trainlist01.txt:" in w and "'..'" in w for w in refused)
    assert any("testlist01.txt:" in w and "absolute path" in w for w in refused)
    assert any("linked.avi" in w and "points outside the dataset root" in w for w in refused)
    assert len(manifest.videos) == 24 and not any(p.resolve() == secret for p in probed)

    hmdb, splits = tmp_path / "hmdb", tmp_path / "splits"
    (hmdb / "climb").mkdir(parents=True)
    splits.mkdir()
    shutil.copy(next((tiny_synthetic / "BarExpand").glob("*.avi")), hmdb / "climb" / "a.avi")
    (splits / "climb_test_split1.txt").write_text("a.avi 1\n../../outside/secret.avi 1\n")
    manifest = index.build_manifest(_config(hmdb, tmp_path / "w2", format="hmdb51", splits_dir=str(splits)))
    assert [v.id for v in manifest.videos] == ["climb/a"]
    assert any("climb_test_split1.txt:2" in w and "'..'" in w for w in manifest.warnings)

    folders = tmp_path / "folders"
    (folders / "walk").mkdir(parents=True)
    shutil.copy(next((tiny_synthetic / "BarExpand").glob("*.avi")), folders / "walk" / "a.avi")
    (folders / "stolen").symlink_to(secret.parent)                  # a linked folder must not become a class
    manifest = index.build_manifest(_config(folders, tmp_path / "w3", format="folders"))
    assert manifest.classes == ("walk",) and [v.id for v in manifest.videos] == ["walk/a"]
    assert any("stolen/secret.avi" in w and "points outside" in w for w in manifest.warnings)
    assert not any(p.resolve() == secret for p in probed)
    followed = index.build_manifest(_config(folders, tmp_path / "w4", format="folders", follow_symlinks="all"))
    assert "stolen" in followed.classes                            # a site that links datasets in, on purpose


# ----------------------------------------------------------------------------- class subsets and maps
def test_a_subset_keeps_its_classes_renumbered_and_names_kept(tiny_synthetic, tmp_path):
    config = _config(tiny_synthetic, tmp_path / "w", classes=("BarRotateLeft", "TriangleExpand"))
    manifest = build_manifest(config)
    assert manifest.classes == ("BarRotateLeft", "TriangleExpand")
    assert {(v.class_name, v.label) for v in manifest.videos} == {("BarRotateLeft", 0), ("TriangleExpand", 1)}
    assert len(manifest.videos) == 8 and all(v.source_class == v.class_name for v in manifest.videos)
    assert any("16 video(s) of classes outside the task" in w for w in manifest.warnings)
    with pytest.raises(DatasetError, match=r"dataset.classes: 'Circle' is not a class of the dataset; its classes: "):
        build_manifest(_config(tiny_synthetic, tmp_path / "w", classes=("Circle",)))


def test_a_class_map_merges_classes_into_a_new_task(tiny_synthetic, tmp_path):
    config = _config(tiny_synthetic, tmp_path / "w",
                     class_map=(("grows", ("TriangleExpand", "BarExpand")), ("other", ("*",))))
    manifest = build_manifest(config)
    assert manifest.classes == ("grows", "other")
    by_class = {name: sorted({v.source_class for v in manifest.videos if v.class_name == name})
                for name in manifest.classes}
    assert by_class == {"grows": ["BarExpand", "TriangleExpand"],
                        "other": ["BarContract", "BarRotateLeft", "TriangleContract", "TriangleRotateLeft"]}
    assert manifest.dataset["task"]["grows"] == ["BarExpand", "TriangleExpand"]
    assert len(manifest.videos) == 24 and {v.label for v in manifest.videos} == {0, 1}
    cases = [((("a", ("TriangleExpand",)), ("b", ("TriangleExpand",))), "is in both"),
             ((("a", ("*",)), ("b", ("*",))), "both 'a' and 'b' take"),
             ((("a", ("Circle",)),), "dataset.class_map.a: 'Circle' is not a class")]
    for bad, message in cases:
        with pytest.raises(DatasetError, match=message):
            build_manifest(_config(tiny_synthetic, tmp_path / "w", class_map=bad))


def test_one_s_own_clips_join_a_standard_dataset(tiny_synthetic, tmp_path):
    mine = tmp_path / "my_clips"
    (mine / "slipping").mkdir(parents=True)
    for i, source in enumerate(sorted((tiny_synthetic / "BarContract").glob("*.avi"))[:3]):
        shutil.copy(source, mine / "slipping" / f"phone{i}.avi")
    config = _config(tiny_synthetic, tmp_path / "w", extra_roots=(str(mine),), test_fraction=0.34,
                     class_map=(("slipping", ("slipping", "BarContract")), ("not_slipping", ("*",))))
    manifest = build_manifest(config)
    own = [v for v in manifest.videos if v.root == 1]
    assert [v.id for v in own] == ["my_clips/slipping/phone0", "my_clips/slipping/phone1", "my_clips/slipping/phone2"]
    assert all(v.class_name == "slipping" and v.path.startswith("slipping/") for v in own)
    assert manifest.dataset["extra_roots"] == [str(mine.resolve())]
    assert sum(v.class_name == "slipping" for v in manifest.videos) == 7
