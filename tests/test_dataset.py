import os
from pathlib import Path

import pytest

from dali_ba.data.dataset import load_dataset, read_file_list, scan_folder
from dali_ba.errors import UsageError


def make_tree(root: Path, spec: dict[str, int]) -> Path:
    for name, count in spec.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(b"x")
    return root


def test_folder_labels_follow_sorted_class_names(tmp_path):
    ds = scan_folder(make_tree(tmp_path, {"zebra": 2, "ant": 1, "moth": 3}))
    assert ds.classes == ("ant", "moth", "zebra")
    assert ds.labels == (0, 1, 1, 1, 2, 2)
    assert len(ds) == 6 and all(Path(f).is_file() for f in ds.files)


def test_validation_labels_use_training_classes(tmp_path):
    train = scan_folder(make_tree(tmp_path / "train", {"a": 1, "b": 1, "c": 1}))
    val = scan_folder(make_tree(tmp_path / "val", {"a": 1, "c": 2}), classes=train.classes)
    assert val.labels == (0, 2, 2)  # 'c' keeps label 2 although 'b' is missing here
    with pytest.raises(UsageError, match="not one of the 3 training classes"):
        scan_folder(make_tree(tmp_path / "val2", {"d": 1}), classes=train.classes)


def test_file_list(tmp_path):
    make_tree(tmp_path, {"x": 2})
    (tmp_path / "list.txt").write_text("# comment\nx/0.jpg 3\n\nx/1.jpg 0\n")
    ds = load_dataset(tmp_path / "list.txt")
    assert ds.labels == (3, 0) and ds.num_classes == 4
    assert ds.files[0].endswith("x/0.jpg")


def test_a_file_list_reads_as_it_is_written_whatever_its_line_ends_and_spacing(tmp_path):
    """Windows line ends, a last line without one, blanks, comments, spaces in names and around the
    label, './' and '//' in paths, and a name that is not UTF-8 on disk all give the paths pathlib would."""
    odd = os.fsdecode(b"latin1-\xe9.jpg")  # a surrogate escape, as os.listdir gives it
    text = f"# made by hand\r\n\r\n  x/a b.jpg   7 \r\n./x//c.jpg 0\r\n/abs/{odd} 2\r\ny/d.jpg 1"
    (tmp_path / "l.txt").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UsageError, match="cannot read file list"):  # not UTF-8 as a whole: one line, named
        read_file_list(tmp_path / "l.txt")
    (tmp_path / "l.txt").write_text(text.replace(odd, "e.jpg"), newline="")
    ds = read_file_list(tmp_path / "l.txt")
    assert list(ds.files) == [
        str(tmp_path / "x/a b.jpg"),
        str(tmp_path / "x/c.jpg"),
        "/abs/e.jpg",
        str(tmp_path / "y/d.jpg"),
    ]
    assert ds.labels == (7, 0, 2, 1) and ds.num_classes == 8


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "data directory not found"),
        (lambda p: (p / "f.jpg").write_bytes(b"") or p / "f.jpg", "not a directory"),
        (lambda p: p, "no class folders"),
        (lambda p: make_tree(p, {"a": 1, "empty": 0}), "class folder has no images: .*empty"),
    ],
)
def test_bad_folders(tmp_path, setup, message):
    with pytest.raises(UsageError, match=message):
        scan_folder(setup(tmp_path))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "has no entries"),
        ("x/0.jpg\n", "expected '<path> <label>'"),
        ("x/0.jpg -1\n", "label >= 0"),
        ("x/0.jpg 1\nx/1.jpg one\n", r"l\.txt:2: expected '<path> <label>'"),
    ],
)
def test_bad_file_lists(tmp_path, text, message):
    make_tree(tmp_path, {"x": 1})
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(UsageError, match=message):
        read_file_list(tmp_path / "l.txt")
    with pytest.raises(UsageError, match="file list not found"):
        read_file_list(tmp_path / "other.txt")


def test_a_file_list_is_trusted_a_missing_file_is_indexed_unlooked_at(tmp_path, monkeypatch):
    """No stat per line (1.28 M lines on a parallel file system): a missing file is indexed, and is a
    broken file when training reads it (tests/test_index_sharing.py)."""
    make_tree(tmp_path, {"x": 1})
    (tmp_path / "l.txt").write_text("x/0.jpg 0\nx/nope.jpg 1\n/abs/elsewhere.jpg 1\n")
    looked_at = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: looked_at.append(str(path)) or real_stat(path, *a, **k))
    ds = read_file_list(tmp_path / "l.txt")
    assert list(ds.files) == [str(tmp_path / "x/0.jpg"), str(tmp_path / "x/nope.jpg"), "/abs/elsewhere.jpg"]
    assert ds.labels == (0, 1, 1) and not [p for p in looked_at if p.endswith(".jpg")]


@pytest.mark.parametrize("target", ["root", "class folder"])
def test_unreadable_data_folder_is_a_usage_error(tmp_path, monkeypatch, target):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    real = os.scandir
    denied = tmp_path if target == "root" else tmp_path / "a"

    def scandir(path):  # what a folder without read permission answers (root would not be refused)
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UsageError, match=f"cannot read .*{denied.name} \\(Permission denied\\)"):
        load_dataset(tmp_path)
