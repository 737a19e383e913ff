"""configs/cluster/: the launcher YAML and the KubeRay RayJob parse, and run what `whisper-batch submit` runs.

Also the job a submission builds (entrypoint, shipped config and code, runtime env): what can be checked without a
cluster. The real submission is tested in tests/integration/test_jobs.py.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from whisper_batch.jobs.cli import main
from whisper_batch.jobs.submit import (
    ENTRYPOINT,
    JOB_CONFIG,
    JOB_LOCK_WAIT_S,
    JobError,
    build_entrypoint,
    connect,
    find_jobs,
    job_config,
    resume_source,
    runtime_env,
    stage_package,
)
from whisper_batch.pipeline.config import config_to_dict, load_config, redacted
from whisper_batch.pipeline.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "configs" / "cluster"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)-gpu$")


def _yaml(name: str):
    with open(CLUSTER / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _parse(command: str, argv: list[str]):
    """Parses argv with the real CLI (options, types, --config existence) without running the command."""
    ctx = main.make_context("whisper-batch", [command, *argv])
    name, cmd, rest = main.resolve_command(ctx, [command, *argv])
    return cmd.make_context(name, rest, parent=ctx).params


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in the cluster files are relative to the project


def _submit_params(launcher: dict) -> dict:
    words = shlex.split(launcher["metadata"]["whisper_batch"]["submit"])
    assert words[:2] == ["whisper-batch", "submit"]
    return _parse("submit", words[2:])


def _rayjob_params(rayjob: dict) -> dict:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert tuple(words[: len(ENTRYPOINT)]) == ENTRYPOINT
    return _parse("run", words[len(ENTRYPOINT) :])


def test_launcher_yaml_is_valid_for_ray():
    import jsonschema

    launcher = _yaml("aws-gpu.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # the schema `ray up` itself checks
    assert launcher["provider"]["type"] == "aws"
    workers = [t for name, t in launcher["available_node_types"].items() if name != launcher["head_node_type"]]
    assert workers and all(GPU_INSTANCE.match(t["node_config"]["InstanceType"]) for t in workers)
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head  # the job server submit talks to


def test_images_agree_with_installed_ray_and_project():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    launcher, rayjob = _yaml("aws-gpu.yaml"), _yaml("kuberay-rayjob.yaml")
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    for image in (base, launcher["docker"]["image"]):
        m = RAY_IMAGE.match(image)
        assert m, f"{image} is not a rayproject/ray GPU image tag"
        assert m["ray"] == ray.__version__, f"{image}: the cluster's Ray must be the project's ({ray.__version__})"
        assert (int(m["py"]), int(m["minor"])) >= (3, 10), f"{image}: the project needs Python >= 3.10"
    assert base == launcher["docker"]["image"]
    pins = " ".join(launcher["setup_commands"]) + (CLUSTER / "Dockerfile").read_text()
    assert pins.count(f'"ray[default]=={ray.__version__}"') == 2
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f"/whisper-batch:{version}")


def test_rayjob_runs_the_submit_entrypoint_with_the_same_config(in_repo):
    rayjob, launcher = _yaml("kuberay-rayjob.yaml"), _yaml("aws-gpu.yaml")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    job = _rayjob_params(rayjob)
    sub = _submit_params(launcher)
    assert (job["input_uri"], job["output"]) == (sub["input_uri"], sub["output"])
    assert job["config"] == sub["config"] and os.path.exists(job["config"])
    # the config a submission ships equals the one the RayJob's entrypoint loads
    shipped, _ = job_config(load_config(sub["config"], list(sub["overrides"])))
    assert config_to_dict(load_config(job["config"], list(job["overrides"]))) == shipped
    assert rayjob["spec"]["entrypoint"] == build_entrypoint(
        job["input_uri"], job["output"], job["config"], job["overrides"]
    )
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/whisper-batch"  # where the Dockerfile puts the project
    assert "WORKDIR /home/ray/whisper-batch" in (CLUSTER / "Dockerfile").read_text()


def test_rayjob_has_gpu_workers_and_no_credentials():
    rayjob = _yaml("kuberay-rayjob.yaml")
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text() + (CLUSTER / "aws-gpu.yaml").read_text()
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)|aws_secret|\bsecret:", text)


# --- the job a submission builds ---


def test_entrypoint_round_trips_through_a_shell():
    entry = build_entrypoint("s3://b/m a.jsonl", "s3://b/out", JOB_CONFIG, ("decode.initial_prompt=it's",))
    words = shlex.split(entry)
    assert words == [*ENTRYPOINT, "s3://b/m a.jsonl", "-o", "s3://b/out", "--config", JOB_CONFIG,
                     "--lock-wait", str(JOB_LOCK_WAIT_S), "--set", "decode.initial_prompt=it's"]


def test_job_config_drops_credentials_and_joins_the_cluster():
    cfg = load_config(None, [
        "storage.storage_options={key: AKIDSECRETKEYID, secret: s3cr3t-value, endpoint_url: 'http://minio:9000',"
        " client_kwargs: {aws_session_token: tok-value, region_name: eu-west-1}, profile: batch}",
        "ray.address=ray://elsewhere:10001",
    ])
    shipped, dropped = job_config(cfg)
    assert sorted(dropped) == ["client_kwargs.aws_session_token", "key", "secret"]
    assert shipped["storage"]["storage_options"] == {
        "endpoint_url": "http://minio:9000", "client_kwargs": {"region_name": "eu-west-1"}, "profile": "batch"
    }
    assert shipped["ray"]["address"] == "auto"
    text = json.dumps(shipped)
    assert "s3cr3t-value" not in text and "AKIDSECRETKEYID" not in text and "tok-value" not in text


def test_stage_package_ships_code_and_a_loadable_config(tmp_path):
    cfg = load_config(None, ["decode.beam_size=3", "manifest.shard_size=7"])
    shipped, _ = job_config(cfg)
    stage_package(str(tmp_path), shipped)
    for package in ("model", "pipeline", "jobs"):
        assert (tmp_path / "whisper_batch" / package / "__init__.py").exists()
    assert (tmp_path / "whisper_batch" / "jobs" / "cli.py").exists() and not list(tmp_path.rglob("__pycache__"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".whisper-batch", "whisper_batch"]
    # the job's interpreter finds the shipped package in its working_dir, not an install's
    probe = subprocess.run([sys.executable, "-c", "import whisper_batch.jobs.cli as c; print(c.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == str(tmp_path / "whisper_batch" / "jobs" / "cli.py"), probe.stderr
    loaded = load_config(str(tmp_path / JOB_CONFIG))
    assert config_to_dict(loaded) == shipped and loaded.decode.beam_size == 3
    env = runtime_env(str(tmp_path))
    assert env["working_dir"] == str(tmp_path) and "pip" not in env
    assert not any(re.search("AWS|SECRET|TOKEN|KEY", name) for name in env["env_vars"])


def test_connect_to_nothing_says_what_was_tried():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(JobError, match=rf"cannot reach the Ray job server at http://127.0.0.1:{port} \(tried GET "):
        connect(f"127.0.0.1:{port}", timeout_s=5)
    assert time.monotonic() - t0 < 10


class _Job:
    def __init__(self, sid, output, start, kind="run"):
        self.submission_id, self.start_time, self.status = sid, start, "STOPPED"
        self.metadata = {"whisper_batch": kind, "output": output}


class _Client:
    def __init__(self, jobs):
        self.jobs = jobs

    def list_jobs(self):
        return self.jobs


def test_find_jobs_matches_output_and_orders_by_start():
    client = _Client([
        _Job("b", "s3://x/out/", 20), _Job("a", "s3://x/out", 10), _Job("c", "s3://x/other", 5),
        _Job("d", "s3://x/out", 30, kind="other-tool"),
    ])
    assert [j.submission_id for j in find_jobs(client, "s3://x/out")] == ["a", "b"]


def test_cli_parses_submit_and_jobs_commands(in_repo):
    params = _parse("submit", ["s3://b/m.jsonl", "-o", "s3://b/o", "--address", "http://h:8265", "--wait",
                               "--set", "manifest.shard_size=1", "--config", "configs/cpu-tiny.yaml"])
    assert params["wait"] and params["address"] == "http://h:8265" and params["overrides"] == ("manifest.shard_size=1",)
    for sub in ("status", "logs", "stop"):
        ctx = main.make_context("whisper-batch", ["jobs", sub, "raysubmit_x", "--address", "h:8265"])
        group = main.get_command(ctx, "jobs")
        gctx = group.make_context("jobs", [sub, "raysubmit_x", "--address", "h:8265"], parent=ctx)
        cmd = group.get_command(gctx, sub)
        assert cmd.make_context(sub, ["raysubmit_x", "--address", "h:8265"], parent=gctx).params["submission_id"]
    assert _parse("resume", ["s3://b/o", "--address", "h:8265"])["output"] == "s3://b/o"
    assert sys.modules["whisper_batch.jobs.submit"].TERMINAL == ("SUCCEEDED", "FAILED", "STOPPED")


def test_resume_source_from_the_last_job_then_from_run_json(tmp_path):
    cfg = load_config(None, ["decode.beam_size=2", "storage.storage_options={key: K1, secret: S1, profile: p}"])
    shipped, _ = job_config(cfg)
    old, new = _Job("a", "s3://x/out", 1), _Job("b", "s3://x/out", 2)
    new.metadata.update(input="s3://x/m.jsonl", config=json.dumps(shipped))
    old.metadata.update(input="s3://x/older.jsonl", config=json.dumps(config_to_dict(load_config(None))))
    inp, got, previous = resume_source(_Client([new, old]), "s3://x/out", ("ray.model_actors=3",))
    assert (inp, previous) == ("s3://x/m.jsonl", "b")
    assert got.decode.beam_size == 2 and got.ray.model_actors == 3 and got.storage.storage_options == {"profile": "p"}
    # no job on this cluster wrote OUTPUT: its run.json (credentials masked there) tells INPUT and the config
    out = str(tmp_path / "out")
    layout = RunLayout(out)
    layout.write_json(layout.run_json, {"input_uri": "s3://x/m.jsonl", "config": redacted(cfg)})
    inp, got, previous = resume_source(_Client([]), out, ())
    assert (inp, previous, got.decode.beam_size) == ("s3://x/m.jsonl", None, 2)
    assert got.storage.storage_options == {"profile": "p"}  # "***" values dropped, never sent as credentials
    with pytest.raises(JobError, match="nothing to resume"):
        resume_source(_Client([]), str(tmp_path / "empty"), ())
