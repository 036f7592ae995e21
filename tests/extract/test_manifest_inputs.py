"""Manifest inputs that used to be misread: line separators in transcripts, non-finite labels, Windows paths and
media reached through symlinks that leave the media root."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil

import pytest
from conftest import MEDIA, write_manifest

from extract.manifest import ManifestError, load_manifest
from extract.manifest_read import count_csv_records

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r\n", "\n", "\r"]


def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "grid").mkdir(parents=True)
    shutil.copy(MEDIA / "grid" / "bbaf2n.mpg", root / "grid" / "bbaf2n.mpg")
    return root


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(s[0]):04X}{'+LF' if len(s) > 1 else ''}" for s in SEPARATORS])
def test_line_separators_inside_a_csv_transcript_are_kept_verbatim(tmp_path, sep):
    rows = [
        {"video_id": "g", "clip_id": "a", "text": f"first{sep}second", "mode": "test", "label": "1.5"},
        {"video_id": "g", "clip_id": "b", "text": "plain", "mode": "valid", "label": "-1"},
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    clips = load_manifest(manifest, None, need_media=False)
    assert [(c.key, c.split, c.text, c.labels) for c in clips] == [
        ("g__a", "test", f"first{sep}second", {"label": 1.5}),
        ("g__b", "valid", "plain", {"label": -1.0}),
    ]
    assert [c.row for c in clips] == [2, 3]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "U+0085"])  # raw in JSON text
def test_line_separators_inside_a_jsonl_transcript_are_kept_verbatim(tmp_path, sep):
    rows = [
        {"video_id": "g", "clip_id": "a", "text": f"one{sep}two", "split": "test"},
        {"video_id": "g", "clip_id": "b", "text": "x"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    clips = load_manifest(tmp_path / "m.jsonl", None, need_media=False)
    assert [(c.key, c.split, c.text) for c in clips] == [("g__a", "test", f"one{sep}two"), ("g__b", "train", "x")]


def test_malformed_csv_quoting_is_a_manifest_error(tmp_path):
    good = "video_id,clip_id,text\ng,a,fine\n"
    for bad in ('g,b,"unterminated\ng,c,swallowed\n', 'g,b,"closed" then more\n'):
        (tmp_path / "m.csv").write_text(good + bad, encoding="utf-8")
        with pytest.raises(ManifestError, match=r"row 3 .*malformed CSV"):
            load_manifest(tmp_path / "m.csv", None, need_media=False)
    (tmp_path / "m.csv").write_text(good + "g,b,hello, world\n", encoding="utf-8")  # an unquoted comma
    with pytest.raises(ManifestError, match=r"row 3: 1 more field\(s\) than the header \(\[' world'\]\)"):
        load_manifest(tmp_path / "m.csv", None, need_media=False)


@pytest.mark.parametrize(
    "text",
    ['a,b\n1,"x\ny"\n\n2,3', 'a,b\r\n"q""\r\nq",1\r\n', 'a\n5" tall\n""\n', "a,b\n,\n", 'a\n"x\u2028y"\r"z"'],
)
def test_the_independent_record_count_agrees_with_the_csv_module(text):
    assert count_csv_records(text) == sum(1 for r in csv.reader(io.StringIO(text, newline="")) if r)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def manifest_problems(path) -> list[str]:
    """The problems ``path`` is refused with (a manifest that loads fails the test)."""
    with pytest.raises(ManifestError) as err:
        load_manifest(path, None, need_media=False)
    return err.value.problems


def test_non_finite_values_are_reported_together_by_row_and_column(tmp_path):
    lines = [
        '{"video_id": "g", "clip_id": "a", "text": "x", "label": NaN}',
        '{"video_id": "g", "clip_id": "b", "text": "x", "labels": {"happy": Infinity}}',
        '{"video_id": "g", "clip_id": "c", "text": "x", "words": [["x", 0.1, -Infinity]]}',
        '{"video_id": "g", "clip_id": "d", "text": "x", "label": 1e400}',
        '{"video_id": "g", "clip_id": "e", "text": "x", "label": "nan"}',
        '{"video_id": "g", "clip_id": "f", "text": "x", "label": 0.5}',
    ]
    assert manifest_problems(write_lines(tmp_path / "m.jsonl", lines)) == [
        "line 1, column 'label': NaN is not a finite number (NaN and Infinity are refused)",
        "line 2, column 'labels': Infinity is not a finite number (NaN and Infinity are refused)",
        "line 3, column 'words': -Infinity is not a finite number (NaN and Infinity are refused)",
        "line 4, column 'label': 1e400 is not a finite number (NaN and Infinity are refused)",
        "line 5, column 'label': 'nan' is not a finite number",
    ]
    rows = [
        {"video_id": "g", "clip_id": "a", "text": "x", "label": "nan"},
        {"video_id": "g", "clip_id": "b", "text": "x", "label_T": "inf", "label_A": "-Infinity"},
        {"video_id": "g", "clip_id": "c", "text": "x", "label_V": "1e400", "annotation": "Negative"},
        {"video_id": "g", "clip_id": "d", "text": "x", "labels": '{"sad": NaN}'},
        {"video_id": "g", "clip_id": "e", "text": "x", "words": '[["x", 0, NaN]]'},
        {"video_id": "g", "clip_id": "f", "text": "x", "labels": '{"sad": "inf"}', "label": "2"},
    ]
    assert manifest_problems(write_manifest(tmp_path / "m.csv", rows)) == [
        "row 2, column 'label': 'nan' is not a finite number",
        "row 3, column 'label_T': 'inf' is not a finite number",
        "row 3, column 'label_A': '-Infinity' is not a finite number",
        "row 4, column 'label_V': '1e400' is not a finite number",
        "row 5, column 'labels': NaN is not a finite number (NaN and Infinity are refused)",
        "row 6, column 'words': NaN is not a finite number",
        "row 7, column 'labels.sad': 'inf' is not a finite number",
    ]


def test_manifest_values_are_type_and_range_checked_and_reported_together(tmp_path):
    """Every field of a row is checked for its type and range where rows are validated, so a value training or
    decoding cannot use (a 401-digit label, a label float32 makes inf, a list as a label, a start of 1e300 s, a
    word time of 401 digits) is one more problem in the one report, not a crash later or a silent NaN."""
    huge = "9" * 401
    lines = [
        f'{{"video_id": "g", "clip_id": "a", "text": "x", "label": {huge}}}',
        '{"video_id": "g", "clip_id": "b", "text": "x", "label": 3.5e38, "labels": {"happy": [1], "sad": "1e39"}}',
        '{"video_id": "g", "clip_id": "c", "text": "x", "label": [1, 2], "labels": [0, 1]}',
        f'{{"video_id": "g", "clip_id": "d", "text": "x", "start": {huge}, "end": 1e300}}',
        f'{{"video_id": "g", "clip_id": "e", "text": "x", "words": [["x", 0, {huge}]]}}',
        '{"video_id": "g", "clip_id": "f", "text": "x", "words": [["x", 0.5], [1, 0, 1]], "start": true}',
        '{"video_id": {"id": 1}, "clip_id": "g", "text": ["x"], "split": ["train"]}',
        '{"video_id": "g", "clip_id": "h", "text": "x", "words": [["late", 11.5, 12]], "start": 100, "end": 110}',
        '{"video_id": "g", "clip_id": 7, "text": "fine", "label": 3.4e38, "labels": {"happy": true}, "start": 1}',
    ]
    problems = manifest_problems(write_lines(tmp_path / "m.jsonl", lines))
    float32 = "is not a finite float32 number (labels are at most 3.4e38)"
    seconds = "is not a time in seconds in [0, 1000000]"
    assert problems == [
        f"line 1, column 'label': an integer of 401 digits {float32}",
        f"line 2, column 'label': 3.5e+38 {float32}",
        "line 2, column 'labels.happy': [1] is a list; a label is a number, a boolean, a text (a class name) or null",
        f"line 2, column 'labels.sad': '1e39' {float32}",
        "line 3, column 'label': [1, 2] is a list; a label is a number, a boolean, a text (a class name) or null",
        "line 3, column 'labels': must be a JSON object, got list",
        f"line 4, column 'start': an integer of 401 digits {seconds}",
        f"line 4, column 'end': 1e+300 {seconds}",
        f"line 5, column 'words': item 0 (['x', 0, {huge[:28]}...): an integer of 401 digits {seconds}",
        "line 6, column 'start': True is not a number of seconds",
        "line 6, column 'words': item 0 (['x', 0.5]) is not [word, start, end] with the word a text",
        "line 7, column 'video_id': {'id': 1} is a dict, not a text",
        "line 7, column 'text': ['x'] is a list, not a text",
        "line 7, column 'split': ['train'] is a list, not a text",
        "line 8, column 'words': 1 word(s) end after the clip (it lasts 10 s; 'late' ends at 12 s): word timings are "
        "on the clip's clock, 0 = its start",
    ]
    (clip,) = load_manifest(write_lines(tmp_path / "ok.jsonl", lines[-1:]), None, need_media=False)
    assert (clip.key, clip.labels, clip.start) == ("g__7", {"label": 3.4e38, "happy": True}, 1.0)
    rows = [
        {"video_id": "g", "clip_id": "a", "text": "x", "label": huge, "start": "1e300", "end": "-1"},
        {"video_id": "g", "clip_id": "b", "text": "x", "label_T": "-3.5e38", "labels": '{"happy": 1e39}'},
        {"video_id": "g", "clip_id": "c", "text": "x", "words": '[["x", 1, 0]]', "start": "inf"},
    ]
    assert manifest_problems(write_manifest(tmp_path / "m.csv", rows)) == [
        f"row 2, column 'start': 1e+300 {seconds}",
        f"row 2, column 'end': -1.0 {seconds}",
        f"row 2, column 'label': '{huge[:36]}... is not a finite number",
        f"row 3, column 'label_T': '-3.5e38' {float32}",
        f"row 3, column 'labels.happy': 1e+39 {float32}",
        "row 4, column 'start': 'inf' is not a number of seconds",
        "row 4, column 'words': item 0 (['x', 1, 0]): the word ends before it starts",
    ]


def test_unlabelled_rows_are_allowed_counted_and_logged(tmp_path, caplog):
    rows = [
        {"video_id": "g", "clip_id": "a", "text": "x", "label": "0.5", "annotation": "Positive"},
        {"video_id": "g", "clip_id": "b", "text": "x", "label": "", "annotation": "Neutral"},
        {"video_id": "g", "clip_id": "c", "text": "x", "label": " ", "annotation": ""},
    ]
    with caplog.at_level(logging.INFO, logger="extract.manifest"):
        clips = load_manifest(write_manifest(tmp_path / "m.csv", rows), None, need_media=False)
    assert [c.labels for c in clips] == [{"label": 0.5, "annotation": "Positive"}, {"annotation": "Neutral"}, {}]
    assert [c.unlabelled for c in clips] == [(), ("label",), ("label", "annotation")]
    assert "2 of 3 rows have no 'label' label (row 3, 4)" in caplog.text
    assert "1 of 3 rows have no 'annotation' label (row 4)" in caplog.text
    lines = [{"video_id": "g", "clip_id": "a", "text": "x", "labels": {"happy": 1, "sad": 0}},
             {"video_id": "g", "clip_id": "b", "text": "x", "labels": {"happy": None}}, {"video_id": "g", "clip_id": "c", "text": "x"}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    clips = load_manifest(tmp_path / "m.jsonl", None, need_media=False)
    assert [c.unlabelled for c in clips] == [(), ("happy", "sad"), ("happy", "sad")]
    # A label column no row fills (MMSA's label_T/label_A/label_V in MOSI's label.csv) leaves nobody unlabelled.
    rows = [{"video_id": "g", "clip_id": k, "text": "x", "label": "1", "label_T": ""} for k in "ab"]
    clips = load_manifest(write_manifest(tmp_path / "mmsa.csv", rows), None, need_media=False)
    assert [c.unlabelled for c in clips] == [(), ()]


def test_windows_paths_are_normalised_and_absolute_ones_refused(tmp_path):
    root = media_root(tmp_path)
    rows = [
        {"video_id": "g", "clip_id": "a", "text": "x", "path": "grid\\bbaf2n.mpg"},
        {"video_id": "g", "clip_id": "b", "text": "x", "path": ".\\grid/bbaf2n.mpg"},
    ]
    clips = load_manifest(write_manifest(tmp_path / "m.csv", rows), root)
    assert [c.media for c in clips] == ["grid/bbaf2n.mpg"] * 2
    assert clips[0].path == root.resolve() / "grid" / "bbaf2n.mpg"
    bad = ["C:\\media\\grid\\bbaf2n.mpg", "c:/media/grid/bbaf2n.mpg", "D:grid\\bbaf2n.mpg", "\\\\server\\share\\x.mp4",
           "\\grid\\bbaf2n.mpg", str(root / "grid" / "bbaf2n.mpg")]  # fmt: skip
    rows = [{"video_id": "g", "clip_id": str(i), "text": "x", "path": p} for i, p in enumerate(bad)]
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path / "m.csv", rows), root)
    assert len(err.value.problems) == len(bad)
    for n, (problem, p) in enumerate(zip(err.value.problems, bad, strict=True), start=2):
        assert problem.startswith(f"row {n}, column 'path': {p!r} is absolute; paths are relative to the media root")


def test_symlinks_leaving_the_media_root_are_refused(tmp_path):
    root = media_root(tmp_path)
    outside = tmp_path / "secret"
    outside.mkdir()
    shutil.copy(MEDIA / "grid" / "bbaf2n.mpg", outside / "clip.mpg")
    (root / "grid" / "leak.mpg").symlink_to(outside / "clip.mpg")  # a file link
    (root / "linked").symlink_to(outside)  # a directory link
    (root / "grid" / "inside.mpg").symlink_to(root / "grid" / "bbaf2n.mpg")  # stays inside: fine
    rows = [
        {"video_id": "grid", "clip_id": "leak", "text": "x"},
        {"video_id": "linked", "clip_id": "clip", "text": "x"},
        {"video_id": "g", "clip_id": "c", "text": "x", "path": "grid/leak.mpg"},
        {"video_id": "g", "clip_id": "d", "text": "x", "path": "linked\\clip.mpg"},
        {"video_id": "grid", "clip_id": "inside", "text": "x"},
    ]
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path / "m.csv", rows), root)
    assert [p.split(":")[0] for p in err.value.problems] == ["row 2", "row 3", "row 4", "row 5"]
    assert all("escapes the media root" in p and "through a symlink" in p for p in err.value.problems)
    (clip,) = load_manifest(write_manifest(tmp_path / "ok.csv", rows[-1:]), root)
    assert clip.path == (root / "grid" / "bbaf2n.mpg").resolve() and clip.media == "grid/bbaf2n.mpg"


def test_extraction_summary_counts_the_unlabelled_clips(tmp_path, tiny_cfg):
    from conftest import bundled_rows

    from extract.pipeline import run_extract

    rows = bundled_rows()
    rows[1]["label"] = ""  # deliberately unlabelled
    summary = run_extract(
        write_manifest(tmp_path / "m.csv", rows), MEDIA, tmp_path / "out", tiny_cfg(modalities="text")
    )
    assert summary["clips_unlabelled"] == 1 and summary["samples_written"] == len(rows)
