"""The graph on a real Ray cluster of several nodes on 127.0.0.1: spread, GPUs, a lost node, a node added, a cluster
that shrinks to nothing.

One cluster for the module (tests/integration/ray_cluster.py): a head with one CPU and no GPU, and worker nodes
with two CPUs and one GPU each, declared with ``ray start --num-gpus=1`` on this CPU-only machine; the runs use
``model.device: cpu``, so the GPU topology (one model actor per GPU, on the nodes that have one) is real Ray
scheduling while the model runs on the CPU. Every run transcribes the packaged examples (4 copies, 16 rows, 8
shards of 2, one row per model call) with the real tiny.en through the CLI, joined to the cluster with
``ray.address``. The tests run in order and share the cluster's history:

1. a clean run: one model actor per declared GPU, spread over the GPU nodes, none on the head; its text is the
   reference of the later runs;
2. a spot preemption: a worker node's whole process group SIGKILLed after the first commit while a new node joins;
   every row ends up once with the reference text (after at most one rerun), and the new node receives actors
   (the model calls wait at a gate, :func:`tests.faults.install_model_gate`, from the kill until the new node has a
   model actor, so the work left is still queued when it joins, however fast the surviving actor is);
3. the cluster shrinks to nothing (every GPU node killed mid-run): the run says what was lost and stops within a
   bounded time; rerun on the GPU-less cluster, the same command fails before any work naming the missing GPU;
   with a GPU node added, the same command completes the output: every row once, reference text.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults import GATE_ENV
from tests.integration.conftest import (
    RUN_TIMEOUT_S,
    completion_records,
    count_ids,
    output_of,
    read_jsonl,
    read_rows,
    start_whisper_batch,
    whisper_batch,
    write_manifest,
)
from tests.integration.ray_cluster import RayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
COPIES = 4
MODEL = "ArrowTranscriber"
FEATURES = "ArrowFeaturizer"
# after a node is lost, a run without progress for this long stops (the product's default is minutes); where no
# node is left for the model stage, a shorter wait suffices
LOST_NODE_TIMEOUT_S = 30
SHRUNK_TIMEOUT_S = 10
# the drivers and the nodes: no token authentication (tests/integration/test_jobs.py covers it)
ENV = {"RAY_AUTH_MODE": "disabled"}
# the GCS declares a killed node dead after ~8 s instead of ~15 s (health checks every 2 s, 4 missed)
HEALTH_CHECKS = {"RAY_health_check_period_ms": "2000", "RAY_health_check_failure_threshold": "4"}


@pytest.fixture(scope="module")
def cluster():
    with RayCluster(env={**os.environ, **ENV, **HEALTH_CHECKS}) as c:
        c.env[GATE_ENV] = str(c.root / "model-gate")  # closed while the file exists (only runs with the gate hook)
        c.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # tests.faults
        c.start_head(num_cpus=1)
        workers = [c.add_node(num_cpus=2, num_gpus=1, timeout=0) for _ in range(2)]  # started side by side
        for node in workers:
            node.wait_started()
        yield c


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[Path, set[str]]:
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(COPIES) for r in read_jsonl(EXAMPLES / "manifest.jsonl")]
    path = write_manifest(tmp_path_factory.mktemp("manifest") / "manifest.jsonl", rows, base=EXAMPLES)
    return path, {r["id"] for r in rows}


def _args(cluster: RayCluster, manifest: Path, out: Path, lost_node_s: float = LOST_NODE_TIMEOUT_S,
          extra: tuple[str, ...] = ()) -> list[Any]:
    sets = [f"ray.address={cluster.address}", "model.device=cpu", "decode.language=en", "manifest.shard_size=2",
            "ray.model_batch_size=1", "ray.gpus_per_model_actor=1", f"ray.lost_node_timeout_seconds={lost_node_s}",
            *extra]
    return ["run", manifest, "-o", out, *(a for s in sets for a in ("--set", s))]


@dataclass
class Watched:
    proc: subprocess.Popen
    out: Path
    log: str
    seconds: float
    # node name -> the most model / feature actors seen alive there at once
    model: dict[str, int] = field(default_factory=dict)
    features: dict[str, int] = field(default_factory=dict)


def _watched_run(cluster: RayCluster, args: list[Any], log: Path, at_first_commit=None, each_sample=None,
                 timeout: float = RUN_TIMEOUT_S) -> Watched:
    """Runs the CLI in the background, sampling each node's live actors; calls ``at_first_commit()`` once when the
    first shard of OUTPUT commits, and ``each_sample(model)`` (the most model actors seen per node) after every
    sample. Bounded by ``timeout`` (the run is killed then, and the test fails)."""
    out = Path(args[3])
    model: dict[str, int] = {}
    features: dict[str, int] = {}
    t0 = time.monotonic()
    proc = start_whisper_batch(*args, log=log, env=ENV)
    try:
        while proc.poll() is None:
            assert time.monotonic() - t0 < timeout, f"the run did not end in {timeout} s:\n{log.read_text()[-3000:]}"
            for node in cluster.nodes:
                if not node.killed:
                    model[node.name] = max(model.get(node.name, 0), node.live_actors(MODEL))
                    features[node.name] = max(features.get(node.name, 0), node.live_actors(FEATURES))
            if at_first_commit is not None and completion_records(out):
                at_first_commit()
                at_first_commit = None
            if each_sample is not None:
                each_sample(model)
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return Watched(proc, out, log.read_text(), time.monotonic() - t0, model, features)


def _check_rows(out: Path, ids: set[str], reference: dict[str, str] | None) -> dict[str, str]:
    rows = read_rows(out)
    assert count_ids(rows) == {i: 1 for i in ids}, f"rows lost or doubled: {count_ids(rows)}"
    texts = {r["id"]: r["text"] for r in rows}
    assert all(r["error"] is None and r["text"].strip() for r in rows), [r for r in rows if r["error"]]
    if reference is not None:
        assert texts == reference, {k: (texts[k], reference[k]) for k in texts if texts[k] != reference[k]}
    return texts


@pytest.fixture(scope="module")
def clean(cluster, manifest, tmp_path_factory) -> Watched:
    """The clean run of the manifest on the head and the two GPU nodes."""
    base = tmp_path_factory.mktemp("clean")
    run = _watched_run(cluster, _args(cluster, manifest[0], base / "out"), base / "run.log")
    print(f"clean run on 3 nodes: {run.seconds:.0f} s")
    assert run.proc.returncode == 0, run.log[-4000:]
    return run


@pytest.fixture(scope="module")
def reference(clean, manifest) -> dict[str, str]:
    """id -> text of the clean run."""
    return _check_rows(clean.out, manifest[1], None)


def test_run_spreads_one_model_actor_per_gpu_over_the_nodes(clean, reference):
    # a model actor per declared GPU, each on its GPU's node; none on the head (no GPU); a feature actor somewhere
    assert clean.model == {"head": 0, "worker1": 1, "worker2": 1}, f"model actors at once per node: {clean.model}"
    assert sum(clean.features.values()) >= 1, clean.features


def test_lost_node_costs_only_its_rows_and_a_new_node_receives_actors(cluster, manifest, reference, tmp_path):
    path, ids = manifest
    out = tmp_path / "out"
    gate = Path(cluster.env[GATE_ENV])
    joined, opened = [], []

    def preempt() -> None:  # a spot preemption: raylet, agents and workers at once; a fresh node joins
        gate.touch()  # the surviving actor's next calls wait, so work stays queued for the node that joins
        joined.append(cluster.add_node(num_cpus=2, num_gpus=1, timeout=0))
        assert cluster.nodes[1].kill() > 0

    def open_gate(model: dict[str, int]) -> None:
        if joined and not opened and model.get(joined[0].name, 0) >= 1:
            gate.unlink()
            opened.append(time.monotonic())

    args = _args(cluster, path, out, extra=("ray.worker_setup_hook=tests.faults.install_model_gate",))
    try:
        run = _watched_run(cluster, args, tmp_path / "run.log", at_first_commit=preempt, each_sample=open_gate)
    finally:
        gate.unlink(missing_ok=True)
    print(f"run with a node lost and one added: exit {run.proc.returncode} after {run.seconds:.0f} s")
    assert joined, "the run ended before its first commit"
    joined[0].wait_started()
    assert opened, f"the node added mid-run got no model actor while work waited: {run.model}\n{run.log[-3000:]}"
    if run.proc.returncode != 0:  # stopped: it must say so, and one rerun of the same command finishes the output
        assert "lost 1 node(s)" in run.log and "rerun the same command" in run.log, run.log[-4000:]
        rerun = whisper_batch(*_args(cluster, path, out), env=ENV)
        assert rerun.returncode == 0, output_of(rerun)[-4000:]
    _check_rows(out, ids, reference)


def test_cluster_shrunk_to_nothing_stops_then_resumes(cluster, manifest, reference, tmp_path):
    path, ids = manifest
    out = tmp_path / "out"
    killed: list = []

    def shrink() -> None:  # every GPU node lost at once: no node left can host a model actor
        for node in [n for n in cluster.nodes if n.num_gpus and not n.killed]:
            node.kill()
            killed.append(node)
        killed.append(time.monotonic())

    args = _args(cluster, path, out, SHRUNK_TIMEOUT_S)
    run = _watched_run(cluster, args, tmp_path / "run.log", at_first_commit=shrink, timeout=RUN_TIMEOUT_S + 60)
    print(f"shrunk to nothing: exit {run.proc.returncode}, {time.monotonic() - killed[-1]:.0f} s after the kill")
    assert run.proc.returncode != 0, run.log[-4000:]
    assert f"lost {len(killed) - 1} node(s)" in run.log and "shrunk to nothing" in run.log, run.log[-4000:]
    assert "rerun the same command to resume" in run.log, run.log[-4000:]
    committed = completion_records(out)
    assert committed and len(committed) < len(ids) // 2, committed

    # the same command on a cluster without GPUs: a clear error before any work
    refused = whisper_batch(*args, env=ENV, timeout=120)
    assert refused.returncode != 0
    message = output_of(refused)
    assert "GPU" in message and "ray.gpus_per_model_actor" in message, message[-3000:]
    assert completion_records(out) == committed

    cluster.add_node(num_cpus=2, num_gpus=1)
    done = whisper_batch(*args, env=ENV)
    assert done.returncode == 0, output_of(done)[-4000:]
    _check_rows(out, ids, reference)
