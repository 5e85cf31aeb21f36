"""A file list read a block at a time with array operations gives exactly what reading it line by
line gives (dali_ba/data/file_list.py), on plain lists and on every odd line a list may hold."""

import random

import pytest

from dali_ba.data import file_list
from dali_ba.data.dataset import read_file_list
from dali_ba.errors import UsageError

ODD_LINES = [
    "",
    "# a comment, with http://a.b/c and a/./b",
    "   ",
    "  x/lead.jpg 4",
    "x/trail.jpg 5  ",
    "x/two  spaces.jpg   6",
    "./x/dot.jpg 1",
    "x//double.jpg 2",
    "/abs/olute.jpg 3",
    "/abs/sub/olute.jpg 13",
    "x/a b c.jpg 7",
    "name-only.jpg 8",
    "ünï/cödé.jpg 9",
    "x/tab\t.jpg 10",
    "x/label.jpg 000012",
]


def plain_lines(rng: random.Random, count: int) -> list[str]:
    """``<folder>/<name> <label>`` lines, folders in runs as a made list has them, some out of order."""
    lines, folder = [], 0
    for i in range(count):
        if rng.random() < 0.05:
            folder = rng.randrange(40)
        lines.append(f"train/c{folder:03d}/img_{i}_{rng.randrange(10 ** rng.randrange(1, 6))}.JPEG {folder}")
    return lines


def read_line_by_line(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(file_list, "_vector_block", lambda *a: False)
        return read_file_list(path)


def assert_same(ours, reference):
    assert tuple(ours.files) == tuple(reference.files)
    assert tuple(ours.labels) == tuple(reference.labels)
    assert ours.classes == reference.classes
    assert ours.files.prefixes == reference.files.prefixes
    assert ours.fingerprint() == reference.fingerprint()


def test_a_plain_list_is_read_with_arrays_and_equals_the_line_by_line_read(tmp_path, monkeypatch):
    monkeypatch.setattr(file_list, "BLOCK_BYTES", 4096)  # many blocks: runs and folders cross them
    lines = plain_lines(random.Random(0), 3000)
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    seen = []
    real = file_list.read_list_columns
    monkeypatch.setattr(file_list, "read_list_columns", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr("dali_ba.data.dataset.read_list_columns", file_list.read_list_columns)
    ours = read_file_list(tmp_path / "l.txt")
    assert seen[0].vector_blocks > 10 and seen[0].line_blocks == 0
    reference = read_line_by_line(tmp_path / "l.txt", monkeypatch)
    assert_same(ours, reference)
    assert ours.files[5] == str(tmp_path / lines[5].split(" ")[0]) and ours.labels[5] == int(lines[5].split(" ")[1])


@pytest.mark.parametrize("odd", ODD_LINES)
def test_each_odd_line_in_a_list_of_plain_ones_reads_as_line_by_line(tmp_path, monkeypatch, odd):
    monkeypatch.setattr(file_list, "BLOCK_BYTES", 2000)
    lines = plain_lines(random.Random(2), 300)
    lines[150] = odd
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    assert_same(read_file_list(tmp_path / "l.txt"), read_line_by_line(tmp_path / "l.txt", monkeypatch))


@pytest.mark.parametrize("seed", range(6))
def test_odd_lines_anywhere_in_a_list_read_as_line_by_line(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    monkeypatch.setattr(file_list, "BLOCK_BYTES", rng.choice([64, 500, 4096]))
    lines = plain_lines(rng, 800)
    for odd in rng.sample(ODD_LINES, 5):
        lines.insert(rng.randrange(len(lines)), odd)
    end = rng.choice(["\n", "\r\n", "\r"])
    text = end.join(lines) + rng.choice(["", end])
    (tmp_path / "l.txt").write_bytes(text.encode())
    assert_same(read_file_list(tmp_path / "l.txt"), read_line_by_line(tmp_path / "l.txt", monkeypatch))
    root = tmp_path / "elsewhere"
    assert tuple(read_file_list(tmp_path / "l.txt", root=root).files)[0].startswith((str(root), "/abs"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("x/no-label.jpg", "expected '<path> <label>'"),
        ("x/neg.jpg -1", "label >= 0"),
        ("x/word.jpg one", "expected '<path> <label>'"),
        ("x/huge.jpg 1234567890", "label 1234567890 is too large"),
        (" 3", "expected '<path> <label>'"),
    ],
)
def test_a_malformed_line_after_blocks_read_with_arrays_is_named_by_its_number(tmp_path, monkeypatch, bad, message):
    monkeypatch.setattr(file_list, "BLOCK_BYTES", 1000)
    lines = plain_lines(random.Random(1), 2000)
    lines[1500] = bad
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=rf"l\.txt:1501: .*{message}"):
        read_file_list(tmp_path / "l.txt")


def test_a_list_of_bare_names_has_no_folder_but_its_own(tmp_path, monkeypatch):
    (tmp_path / "l.txt").write_text("b.jpg 1\na.jpg 0\n")
    ds = read_file_list(tmp_path / "l.txt")
    assert list(ds.files) == [str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg")] and ds.labels == (1, 0)
    assert_same(ds, read_line_by_line(tmp_path / "l.txt", monkeypatch))


def test_a_list_of_only_comments_has_no_entries(tmp_path):
    (tmp_path / "l.txt").write_text("# one\n\n# two\n")
    with pytest.raises(UsageError, match="has no entries"):
        read_file_list(tmp_path / "l.txt")
