"""Manifest readers: formats, path resolution, ids, errors, folder/glob listing, fsspec (memory://) URIs."""

import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.inputs.base import InputFormat
from whisper_batch.pipeline.manifest import ManifestError, ManifestRow, default_id, read_manifest
from whisper_batch.pipeline.plan import build_plan

ROWS = [
    {"audio_filepath": "audio/a.flac", "id": "utt-a", "duration": 2.5, "text": "hello there", "speaker": "s1"},
    {"audio_filepath": "/abs/b.wav", "offset": 3.0, "lang": "de", "speaker": "s2", "score": 7},
    {"audio_filepath": "s3://bucket/c.mp3", "language": "en"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_fields_and_resolution(tmp_path):
    rows = list(read_manifest(write_jsonl(tmp_path / "m.jsonl", ROWS)))
    assert [r.index for r in rows] == [0, 1, 2]
    a, b, c = rows
    assert a.id == "utt-a" and a.audio_filepath == "audio/a.flac"
    assert a.uri == str(tmp_path / "audio" / "a.flac")  # relative to the manifest's folder, not the cwd
    assert a.duration == 2.5 and a.offset == 0.0 and a.reference == "hello there"
    assert a.extra == {"speaker": "s1"}
    assert b.uri == "/abs/b.wav" and b.offset == 3.0 and b.language == "de" and b.reference is None
    assert b.extra == {"speaker": "s2", "score": 7}
    assert c.uri == "s3://bucket/c.mp3" and c.language == "en" and c.duration is None


def test_csv_matches_jsonl(tmp_path):
    (tmp_path / "m.csv").write_text(
        "audio_filepath,id,duration,text,speaker\naudio/a.flac,utt-a,2.5,hello there,s1\n../x.wav,,,,\n"
    )
    a, x = read_manifest(str(tmp_path / "m.csv"))
    assert (a.id, a.uri, a.duration, a.reference, a.extra) == (
        "utt-a", str(tmp_path / "audio" / "a.flac"), 2.5, "hello there", {"speaker": "s1"})
    assert x.uri == str(tmp_path.parent / "x.wav") and x.duration is None and x.reference is None
    assert x.id.startswith("x-")


def test_parquet_streams_batches(tmp_path):
    n = 10_000  # more than one record batch
    table = pa.table({"audio_filepath": [f"f{i}.wav" for i in range(n)], "duration": [1.0] * n, "spk": list(range(n))})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=3000)
    rows = list(read_manifest(str(tmp_path / "m.parquet")))
    assert len(rows) == n and [r.index for r in rows] == list(range(n))
    assert rows[-1].extra == {"spk": n - 1} and rows[-1].uri == str(tmp_path / f"f{n - 1}.wav")


def test_default_ids_stable_readable_and_distinct_by_offset(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"audio_filepath": "long/talk.flac", "offset": 0.0, "duration": 30},
        {"audio_filepath": "long/talk.flac", "offset": 30.0, "duration": 30},
    ])
    first, second = read_manifest(path)
    assert first.id.startswith("talk-") and len(first.id) == len("talk-") + 8
    assert first.id != second.id
    assert [r.id for r in read_manifest(path)] == [first.id, second.id]  # stable across reads
    assert first.id == default_id("long/talk.flac", 0)  # from the path as written: survives moving the dataset


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"audio_filepath": "a.wav"}\n{"audio_filepath": "b.wav"\n', "line 2: bad JSON"),
        ('{"audio_filepath": "a.wav"}\n\n{"text": "no audio"}\n', "line 3: missing or empty 'audio_filepath'"),
        ('{"audio_filepath": "a.wav", "duration": "long"}\n', "line 1: 'duration' must be a number"),
        ('{"audio_filepath": "a.wav", "offset": -1}\n', "line 1: 'offset' must be >= 0"),
        ('[{"audio_filepath": "a.wav"}]\n', "line 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, content, match):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ManifestError, match=match) as err:
        list(read_manifest(str(tmp_path / "m.jsonl")))
    assert "m.jsonl" in str(err.value)


def test_unknown_extension_is_clear(tmp_path):
    (tmp_path / "m.txt").write_text("a.wav\n")
    with pytest.raises(ManifestError, match=r"cannot tell the format.*\.jsonl/\.json, \.csv or \.parquet"):
        list(read_manifest(str(tmp_path / "m.txt")))
    with pytest.raises(ManifestError, match="does not exist"):
        list(read_manifest(str(tmp_path / "missing")))


def make_audio_tree(root):
    for name in ["b.flac", "a.wav", "sub/c.MP3", "sub/deeper/d.ogg", "notes.txt", "sub/cover.jpg"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_folder_lists_audio_recursively_sorted(tmp_path):
    make_audio_tree(tmp_path)
    rows = list(read_manifest(str(tmp_path)))
    assert [r.uri for r in rows] == [str(tmp_path / p) for p in ["a.wav", "b.flac", "sub/c.MP3", "sub/deeper/d.ogg"]]
    assert all(r.audio_filepath == r.uri and r.extra == {} for r in rows)
    assert len({r.id for r in rows}) == 4 and rows[0].id.startswith("a-")


def test_glob(tmp_path):
    make_audio_tree(tmp_path)
    rows = list(read_manifest(str(tmp_path / "sub" / "*")))
    assert [r.uri for r in rows] == [str(tmp_path / "sub" / "c.MP3")]


def test_record_is_flat_plain_types(tmp_path):
    row = next(read_manifest(write_jsonl(tmp_path / "m.jsonl", ROWS[1:2])))
    record = row.to_record(shard_id=4)
    assert record == {
        "shard_id": 4, "row_index": 0, "id": row.id, "audio_filepath": "/abs/b.wav", "uri": "/abs/b.wav",
        "offset": 3.0, "duration": None, "reference": None, "language": "de",
        "extra_json": json.dumps({"speaker": "s2", "score": 7}),
    }


class LinesOfPaths(InputFormat):
    """A format of the test's own: a .lst file of audio paths, one a line."""

    def detect(self, loc, cfg):
        return "lines" if loc.suffix == ".lst" else None

    def iter_rows(self, loc, name, cfg):
        with loc.fs.open(loc.path, "rt") as f:
            for index, line in enumerate(f):
                yield ManifestRow(index, f"line-{index}", line.strip(), line.strip())


def test_a_format_added_to_the_list_reads_its_inputs(tmp_path, monkeypatch):
    from whisper_batch.pipeline import inputs

    (tmp_path / "m.lst").write_text("/a.wav\n/b.wav\n/c.wav\n")
    with pytest.raises(ManifestError, match="cannot tell the format"):
        list(read_manifest(str(tmp_path / "m.lst")))
    monkeypatch.setattr(inputs, "INPUT_FORMATS", (*inputs.INPUT_FORMATS, LinesOfPaths()))
    assert [r.uri for r in read_manifest(str(tmp_path / "m.lst"))] == ["/a.wav", "/b.wav", "/c.wav"]
    plan = build_plan(str(tmp_path / "m.lst"), load_config(None, ["manifest.shard_size=2"]))
    assert plan.manifest_format == "lines" and plan.shard_starts is None and plan.n_shards == 2


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_remote_manifest_resolves_relative_paths_on_its_filesystem(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/sets/m.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:2]) +
                 b'{"audio_filepath": "../shared/z.wav"}\n')
    a, b, z = read_manifest(f"memory://{root}/sets/m.jsonl")
    assert a.uri == f"memory://{root}/sets/audio/a.flac"
    assert b.uri == "/abs/b.wav"  # absolute paths are kept as written
    assert z.uri == f"memory://{root}/shared/z.wav"


def test_remote_folder_listing(memfs):
    fs, root = memfs
    for name in ["x/2.wav", "x/1.flac", "x/readme.md"]:
        fs.pipe_file(f"{root}/{name}", b"x")
    rows = list(read_manifest(f"memory://{root}/x/"))
    assert [r.uri for r in rows] == [f"memory://{root}/x/1.flac", f"memory://{root}/x/2.wav"]
