"""Corpora as they are stored: WebDataset tar shards and Parquet files with embedded audio, end to end.

The example set packed into tars (audio + .json with text and an extra field) and into Parquet (HF datasets'
{bytes, path} struct), each transcribed from local disk and from the S3 server on loopback (the runs in-process,
joined to the output-focused modules' shared Ray head): every sample exactly once, ids equal to the keys / the id
column, the extra field carried, text equal to the manifest run's. Then a driver killed mid-run on a tar input
(the CLI with its own local Ray, its whole process group SIGKILLed after the first commit plus a random delay) resumes
exactly once. The delay's seed is printed and taken from WB_KILL_SEED when set, so a failing case can be replayed:
WB_KILL_SEED=1234 pytest ... -k killed.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import (
    RUN_TIMEOUT_S,
    completion_records,
    count_ids,
    descendants,
    output_of,
    read_rows,
    shared_ray_address,
    sigkill,
    start_whisper_batch,
    stop_processes,
    wait_until,
    whisper_batch,
)
from tests.servers import moto_s3
from whisper_batch.pipeline.config import load_config

pytestmark = pytest.mark.integration
JOINS_SHARED_RAY = True  # its runs are about the output: they join one shared Ray head (conftest._shared_ray)
# the killed driver's runs keep a local Ray of their own: its kill takes that Ray down with the driver
OWN_RAY = {"RAY_ADDRESS": ""}

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# the three short example utterances (the long one would only add compute)
IDS = ("fox", "weather", "coffee")


def _examples() -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLES / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [{**r, "speaker": f"spk-{r['id']}"} for r in rows if r["id"] in IDS]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, rows: list[dict], per_tar: int, key=lambda r, i: r["id"]) -> list[Path]:
    """WebDataset tars: <key>.<audio ext> and <key>.json with the text and the extra field."""
    paths = []
    for t in range(0, len(rows), per_tar):
        path = folder / f"shard-{t // per_tar:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, r in enumerate(rows[t : t + per_tar], start=t):
                k = key(r, i)
                _add(tar, f"{k}.{r['audio_filepath'].rsplit('.', 1)[1]}", (EXAMPLES / r["audio_filepath"]).read_bytes())
                _add(tar, f"{k}.json", json.dumps({"text": r["text"], "speaker": r["speaker"]}).encode())
        paths.append(path)
    return paths


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """The HF datasets layout: audio {bytes, path}, then the other columns; two row groups."""
    table = pa.table({
        "audio": [{"bytes": (EXAMPLES / r["audio_filepath"]).read_bytes(), "path": r["audio_filepath"]} for r in rows],
        "id": [f"pq-{r['id']}" for r in rows],
        "text": [r["text"] for r in rows],
        "speaker": [r["speaker"] for r in rows],
    })
    pq.write_table(table, path, row_group_size=2)
    return path


KEY_ID, SECRET = "AKIAWBTEST0000000013", "wb-test-secret-13"


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY_ID, secret=SECRET, skip_instance_cache=True)


@pytest.fixture(scope="module")
def runs(endpoint, tmp_path_factory):
    """The manifest run and the four container runs, in-process, joined to the shared head."""
    import ray

    from whisper_batch.jobs.run import run

    base = tmp_path_factory.mktemp("containers")
    rows = _examples()
    manifest = base / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio_filepath": str(EXAMPLES / r["audio_filepath"])}) + "\n"
                                for r in rows))
    tars = write_shards(base, rows, per_tar=2)
    parquet = write_parquet(base / "train-00000.parquet", rows)
    fs = _fs(endpoint)
    fs.mkdir("corpus")
    for p in [*tars, parquet]:
        fs.put(str(p), f"corpus/{p.name}")
    so = [f"storage.storage_options={json.dumps({'endpoint_url': endpoint, 'key': KEY_ID, 'secret': SECRET})}"]
    inputs = {
        "manifest": str(manifest),
        "tar": str(base / "shard-{000000..000001}.tar"),
        "parquet": str(parquet),
        "tar-s3": "s3://corpus/shard-*.tar",
        "parquet-s3": "s3://corpus/train-*.parquet",
    }
    out = {}
    try:
        for name, uri in inputs.items():
            cfg = load_config(None, [*(so if name.endswith("s3") else []), f"ray.address={shared_ray_address()}"])
            t0 = time.monotonic()
            run(uri, str(base / name), cfg, echo=lambda s: None)
            print(f"{name}: {time.monotonic() - t0:.1f} s")
            out[name] = read_rows(base / name)
    finally:
        ray.shutdown()
    return {"rows": rows, "out": out}


@pytest.mark.parametrize("name", ["tar", "parquet", "tar-s3", "parquet-s3"])
def test_container_input_matches_the_manifest_run(runs, name):
    expected = {r["id"]: r for r in runs["out"]["manifest"]}
    assert len(expected) == len(IDS) and all(r["text"].strip() for r in expected.values())
    got = runs["out"][name]
    prefix = "pq-" if name.startswith("parquet") else ""
    assert count_ids(got) == {prefix + i: 1 for i in IDS}  # every sample exactly once, ids = keys / id column
    for r in got:
        ref = expected[r["id"].removeprefix(prefix)]
        assert r["error"] is None, r["error"]
        assert r["text"] == ref["text"] and r["reference"] == ref["reference"]
        assert r["speaker"] == ref["speaker"]  # the extra field carried
        if name.startswith("tar"):
            assert r["audio_filepath"].startswith(f"tar://{r['id']}.") and ".tar" in r["audio_filepath"]


MAX_EXTRA_DELAY_S = 0.25  # after the first commit: the 9 short shards can all commit within a second of it


@pytest.mark.slow
def test_killed_driver_on_a_tar_input_resumes_exactly_once(tmp_path):
    rows = _examples() * 3  # 9 samples in 3 tars, one shard per sample: the kill lands between commits
    write_shards(tmp_path, rows, per_tar=3, key=lambda r, i: f"{i:03d}-{r['id']}")
    uri = str(tmp_path / "shard-*.tar")
    sets = ["--set", "manifest.shard_size=1", "--set", "ray.model_batch_size=1"]
    seed = int(os.environ.get("WB_KILL_SEED") or time.time_ns() % 1_000_000)
    delay = random.Random(seed).uniform(0.0, MAX_EXTRA_DELAY_S)
    print(f"kill after the first commit + {delay:.2f} s (WB_KILL_SEED={seed})")
    out = tmp_path / "out"
    proc = start_whisper_batch("run", uri, "-o", out, *sets, log=tmp_path / "killed.log", env=OWN_RAY)
    try:
        if not wait_until(lambda: bool(completion_records(out)), proc, RUN_TIMEOUT_S, poll=0.1):
            pytest.fail(f"no shard committed before the driver ended:\n{(tmp_path / 'killed.log').read_text()[-3000:]}")
        time.sleep(delay)
        tree = descendants(proc.pid)  # Ray's daemons and workers, some in process groups of their own
    finally:
        running = sigkill(proc, group=True)
    at_kill = completion_records(out)
    assert running and len(at_kill) < len(rows), f"the run ended before the kill (seed {seed}): nothing was interrupted"
    for path in (out / "transcripts").glob("*"):  # whatever the kill left in transcripts/ is complete Parquet
        assert path.name.endswith(".parquet"), f"the kill left {path.name} in transcripts/"
        pq.read_table(path)

    # the rerun starts while the killed run's Ray workers may still be winding down
    proc2 = whisper_batch("run", uri, "-o", out, *sets, env=OWN_RAY)
    stragglers = stop_processes(tree)
    assert proc2.returncode == 0, f"the rerun after the kill (seed {seed}) failed:\n{output_of(proc2)[-4000:]}"
    got = read_rows(out)
    keys = [f"{i:03d}-{r['id']}" for i, r in enumerate(rows)]
    assert count_ids(got) == {k: 1 for k in keys}, f"seed {seed}"
    assert all(r["error"] is None and r["text"].strip() for r in got)
    by_text = {}
    for r in got:  # the same audio under three keys, whichever run decoded it: the same text each time
        by_text.setdefault(r["id"].split("-", 1)[1], set()).add(r["text"])
    assert all(len(texts) == 1 for texts in by_text.values()), f"seed {seed}: {by_text}"
    records = completion_records(out)
    assert sorted(records) == list(range(len(rows)))
    for shard_id, rec in at_kill.items():  # shards committed before the kill were not redone
        assert records[shard_id]["finished_at"] == rec["finished_at"], f"shard {shard_id} was redone"
    assert not stragglers, f"processes of the killed run still alive 30 s after the rerun: {sorted(stragglers)}"
