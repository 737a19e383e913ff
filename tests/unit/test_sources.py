"""Tar shards (WebDataset layout) and Parquet with embedded audio as input: samples, refs, plan shards, bad input."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from whisper_batch.pipeline.config import RunConfig
from whisper_batch.pipeline.features import Featurizer
from whisper_batch.pipeline.inputs.containers import SampleRef, expand_braces, parse_ref
from whisper_batch.pipeline.inputs.tar_shards import read_tar_members
from whisper_batch.pipeline.manifest import ManifestError, read_manifest
from whisper_batch.pipeline.plan import build_plan, iter_blocks
from whisper_batch.pipeline.sources import iter_sample_audio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FOX = (EXAMPLES / "fox.flac").read_bytes()
COFFEE = (EXAMPLES / "coffee.ogg").read_bytes()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
    return path


def sample(i: int, **extra) -> tuple[str, dict[str, bytes]]:
    meta = {"text": f"utterance {i}", "speaker": f"s{i % 2}", **extra}
    return f"{i:04d}", {"flac": FOX, "json": json.dumps(meta).encode()}


def records(uri: str, cfg: RunConfig) -> list[dict]:
    plan = build_plan(uri, cfg)
    return [r for _, recs in iter_blocks(uri, plan, range(plan.n_shards), 1000) for r in recs]


def test_expand_braces():
    assert expand_braces("s3://b/shard-{000..002}.tar") == [f"s3://b/shard-00{i}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_ref_round_trip():
    for ref in [SampleRef("tar", "s3://b/x #1.tar", 1536, "dir/a b.flac"),
                SampleRef("parquet", "/d/t.parquet", 7, "audio"),
                SampleRef("error", "/d/x.tar", 0, "not found: sample 'k' in /d/x.tar has no audio member")]:
        assert parse_ref(ref.to_uri()) == ref
    assert parse_ref("/data/a#b.flac") is None and parse_ref("s3://b/a.flac") is None


def test_tar_samples_become_rows_and_shards_follow_tars(tmp_path):
    write_tar(tmp_path / "shard-000000.tar", [sample(i) for i in range(5)])
    # .txt is the reference when the .json has no text; members of other kinds are ignored
    write_tar(tmp_path / "shard-000001.tar", [("0100", {"wav.flac": FOX, "txt": b" from txt \n", "cls": b"3"})])
    cfg = RunConfig()
    cfg = type(cfg)(**{**cfg.__dict__, "manifest": type(cfg.manifest)(shard_size=3)})
    uri = str(tmp_path / "shard-{000000..000001}.tar")
    rows = list(read_manifest(uri, cfg=cfg.manifest))
    assert [r.id for r in rows] == ["0000", "0001", "0002", "0003", "0004", "0100"]
    assert rows[1].reference == "utterance 1" and rows[1].extra == {"speaker": "s1"}
    assert rows[5].reference == "from txt" and rows[5].extra == {}
    assert rows[0].audio_filepath == f"tar://0000.flac::{tmp_path}/shard-000000.tar"
    plan = build_plan(uri, cfg)
    assert plan.manifest_format == "tar" and plan.extra_types == {"speaker": "string"}
    # a shard never spans two tars; a tar of 5 samples and shard_size 3 is two consecutive shards
    assert plan.shard_starts == [0, 3, 5] and plan.n_shards == 3
    assert [plan.shard_of(i) for i in range(6)] == [0, 0, 0, 1, 1, 2]
    recs = [r for _, recs in iter_blocks(uri, plan, [1, 2], 1) for r in recs]
    assert [(r["id"], r["shard_id"]) for r in recs] == [("0003", 1), ("0004", 1), ("0100", 2)]
    audio = dict((r["id"], d) for r, d in iter_sample_audio(recs))
    assert audio == {"0003": FOX, "0004": FOX, "0100": FOX}


def test_a_shard_in_the_middle_of_a_tar_reads_its_own_span_only(tmp_path):
    path = write_tar(tmp_path / "big.tar", [sample(i) for i in range(6)])
    refs = [parse_ref(r.uri) for r in read_manifest(str(path))]

    class Counting(io.FileIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.read_bytes += len(data)
            return data

        def readinto(self, b):
            n = super().readinto(b)
            Counting.read_bytes += n or 0
            return n

    with Counting(path) as f:
        got = list(read_tar_members(f, [(r.position, r.name) for r in refs[4:]], str(path), compressed=False))
    assert [g[2] for g in got] == [FOX, FOX]
    # from sample 4's header on: a little read-ahead past the last member, nothing of samples 0-3
    assert Counting.read_bytes < path.stat().st_size - refs[4].position + 20 * 1024
    assert Counting.read_bytes < path.stat().st_size / 2


def test_parquet_with_embedded_audio(tmp_path):
    table = pa.table({
        "audio": [{"bytes": FOX, "path": "fox.flac"}, {"bytes": COFFEE, "path": None}, {"bytes": None, "path": None}],
        "text": ["a fox", "coffee", "nothing"],
        "lang": ["en", "en", "en"],
        "n": [1, 2, 3],
    })
    pq.write_table(table, tmp_path / "train-0.parquet", row_group_size=2)
    pq.write_table(table.drop_columns(["n"]).append_column("id", pa.array(["x", "y", "z"])),
                   tmp_path / "train-1.parquet")
    cfg = RunConfig()
    recs = records(str(tmp_path / "train-*.parquet"), cfg)
    assert [r["id"] for r in recs] == ["train-0-000000", "train-0-000001", "train-0-000002", "x", "y", "z"]
    assert [r["shard_id"] for r in recs] == [0, 0, 0, 1, 1, 1]
    assert (recs[0]["reference"] == "a fox" and recs[0]["language"] == "en"
            and json.loads(recs[0]["extra_json"]) == {"n": 1})
    got = [(r["id"], d) for r, d in iter_sample_audio(recs)]
    assert [d for _, d in got[:2]] == [FOX, COFFEE]
    # an empty struct is that row's error, the other rows go on
    assert str(got[2][1]).startswith("empty: row 2 of") and got[3][1] == FOX
    # one Parquet file as INPUT, the default column "audio" found because it holds bytes
    assert build_plan(str(tmp_path / "train-1.parquet"), cfg).manifest_format == "parquet-audio"


def test_parquet_audio_column_of_the_wrong_type_is_an_error_before_any_work(tmp_path):
    pq.write_table(pa.table({"audio": [1, 2], "text": ["a", "b"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: audio column 'audio' has type int64"):
        build_plan(str(tmp_path / "bad.parquet"), RunConfig())
    struct = pa.array([{"path": "a.wav", "sampling_rate": 16000}])
    pq.write_table(pa.table({"audio": struct}), tmp_path / "nobytes-0.parquet")
    with pytest.raises(ValueError, match=r"audio column 'audio' has type struct"):
        build_plan(str(tmp_path / "nobytes-*.parquet"), RunConfig())


def test_duplicate_keys_across_tars_are_an_error_naming_key_and_shards(tmp_path):
    write_tar(tmp_path / "a.tar", [sample(1), sample(2)])
    write_tar(tmp_path / "b.tar", [sample(2)])
    with pytest.raises(ManifestError, match=r"'0002' \(rows 1, 2 in .*a.tar, .*b.tar\)"):
        build_plan(str(tmp_path / "*.tar"), RunConfig())


def test_bad_samples_become_error_rows(tmp_path):
    write_tar(tmp_path / "s-0.tar", [
        sample(0),
        ("0001", {"json": b'{"text": "no audio"}'}),  # no audio member
        ("0002", {"flac": FOX, "wav": FOX, "json": b"{}"}),  # two audio members under one key
        ("0003", {"flac": b"not audio at all", "json": b"{}"}),  # undecodable
        sample(4),
    ])
    whole = write_tar(tmp_path / "s-1.tar", [sample(10), sample(11), sample(12)]).read_bytes()
    (tmp_path / "s-1.tar").write_bytes(whole[: len(whole) - 2048 - 30000])  # cut inside sample 12's audio
    cfg = RunConfig()
    recs = records(str(tmp_path / "s-*.tar"), cfg)
    assert [r["id"] for r in recs] == ["0000", "0001", "0002", "0003", "0004", "0010", "0011", "0012"]
    out = {r["id"]: r for r in Featurizer(cfg).featurize_rows(recs)}
    assert len(out) == 8
    errors = {k: r["error"] for k, r in out.items() if r["error"]}
    assert set(errors) == {"0001", "0002", "0003", "0012"}
    assert errors["0001"].startswith("not found: sample '0001'") and "no audio member (0001.json)" in errors["0001"]
    assert (errors["0002"].startswith("decode failed: sample '0002'")
            and "2 audio members (0002.flac, 0002.wav)" in errors["0002"])
    assert errors["0003"].startswith("decode failed:")
    assert errors["0012"].startswith("decode failed: tar") and "truncated" in errors["0012"]
    for k in ("0000", "0004", "0010", "0011"):
        assert out[k]["mel_frames"] and abs(out[k]["audio_seconds"] - 3.44) < 0.05


def test_a_tar_changed_since_the_plan_gives_error_rows(tmp_path):
    path = write_tar(tmp_path / "x.tar", [sample(0), sample(1)])
    recs = records(str(path), RunConfig())
    path.write_bytes(path.read_bytes()[:1024])  # truncated after the plan
    got = {r["id"]: d for r, d in iter_sample_audio(recs)}
    assert str(got["0000"]).startswith("decode failed: tar") and str(got["0001"]).startswith("not found:")


def test_the_driver_reads_each_tar_once_per_run(tmp_path, monkeypatch):
    from whisper_batch.pipeline.inputs import containers

    write_tar(tmp_path / "a.tar", [sample(1), sample(2)])
    write_tar(tmp_path / "b.tar", [sample(3)])
    opened = []
    real = containers.open_container
    monkeypatch.setattr(containers, "open_container", lambda fs, p: opened.append(Path(p).name) or real(fs, p))
    uri = str(tmp_path / "*.tar")
    first = records(uri, RunConfig())  # the plan pass streams the tars; staging replays what it read
    assert opened == ["a.tar", "b.tar"]
    assert records(uri, RunConfig()) == first and opened == ["a.tar", "b.tar"] * 2  # a new run reads them anew
