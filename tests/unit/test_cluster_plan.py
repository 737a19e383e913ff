"""The graph's plan on clusters of several nodes, its resource check, the lost-node watch, and the job client's
address checks, without Ray (the cluster is described to them; real clusters: tests/integration/test_cluster.py)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from whisper_batch.pipeline import cluster
from whisper_batch.pipeline.config import load_config


def _node(node_id: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    res = {"CPU": cpus, "memory": 8e9, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": node_id * 8, "Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": res}


def _cluster(monkeypatch, nodes: list[dict]) -> None:
    live = [n for n in nodes if n["Alive"]]
    total = {k: sum(n["Resources"].get(k, 0) for n in live) for k in ("CPU", "GPU", "memory")}
    monkeypatch.setattr(cluster, "alive_nodes", lambda: live)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(cluster.ray, "nodes", lambda: nodes)


def test_cpu_plan_on_several_nodes_takes_whole_cores(monkeypatch):
    _cluster(monkeypatch, [_node("a", 1), _node("b", 1), _node("c", 1)])
    # one core per model actor, one left for the feature actor: they pack whatever the nodes' sizes
    assert cluster.model_resources(load_config(None, [])) == cluster.ModelPlan(2, 0.0, 1.0, 1, 4, 16)


def test_a_node_whose_raylet_is_gone_is_left_out_of_the_plan(monkeypatch, caplog):
    """Ray lists a SIGKILLed node as alive for ~30 s; a run planned then must not count its cores."""
    server = socket.create_server(("127.0.0.1", 0))  # a raylet that answers
    dead = socket.create_server(("127.0.0.1", 0))  # a port whose listener is gone: connections are refused
    dead_port = dead.getsockname()[1]
    dead.close()
    try:
        nodes = [_node("a", 2), _node("b", 2), _node("c", 2)]
        for node, port in zip(nodes, (server.getsockname()[1], server.getsockname()[1], dead_port), strict=True):
            node.update(NodeManagerAddress="127.0.0.1", NodeManagerPort=port)
        _cluster(monkeypatch, nodes)
        assert [n["NodeID"] for n in cluster.usable_nodes()] == ["a" * 8, "b" * 8]
        # 4 cores that answer: 3 model actors and the feature actor's core (with c's 2 counted: 5 model actors, and
        # once c was declared dead no core left for the feature actor)
        assert cluster.model_resources(load_config(None, [])).actors == 3
        assert "cccccccc" in caplog.text and "does not answer" in caplog.text
    finally:
        server.close()


def test_gpu_plan_is_one_actor_per_gpu(monkeypatch):
    _cluster(monkeypatch, [_node("a", 1), _node("b", 2, gpus=1), _node("c", 2, gpus=1)])
    plan = cluster.model_resources(load_config(None, ["model.device=cpu"]))
    assert (plan.actors, plan.gpus, plan.cpus) == (2, 1.0, 1.0)


def test_pools_autoscale_on_several_nodes_and_stay_fixed_on_one(monkeypatch):
    _cluster(monkeypatch, [_node("a", 1), _node("b", 1)])
    pool = cluster.actor_pool(3, None)
    assert (pool.min_size, pool.initial_size, pool.max_size) == (1, 3, float("inf"))
    assert cluster.actor_pool(2, 5).max_size == 5
    _cluster(monkeypatch, [_node("a", 4)])
    pool = cluster.actor_pool(3, None)
    assert (pool.min_size, pool.initial_size, pool.max_size) == (3, 3, 3)
    assert cluster.actor_pool(3, 6).max_size == 6


def test_a_config_asking_for_a_gpu_the_cluster_lacks_is_refused(monkeypatch):
    _cluster(monkeypatch, [_node("a", 2), _node("b", 2)])
    cfg = load_config(None, ["ray.gpus_per_model_actor=1", "model.device=cpu"])
    with pytest.raises(cluster.ClusterResourceError, match=r"needs 1 GPU.*gpus_per_model_actor=1.*0 GPUs"):
        cluster.check_cluster(cfg, cluster.model_resources(cfg))
    cfg = load_config(None, ["model.device=cuda"])
    with pytest.raises(cluster.ClusterResourceError, match="model.device=cuda but .* has no GPU"):
        cluster.check_cluster(cfg, cluster.model_resources(cfg))
    _cluster(monkeypatch, [_node("a", 2), _node("b", 2, gpus=1)])
    cfg = load_config(None, ["ray.gpus_per_model_actor=1", "model.device=cpu"])
    cluster.check_cluster(cfg, cluster.model_resources(cfg))  # fits: no error


def test_node_watch_stops_a_run_whose_lost_node_is_not_made_up_for(monkeypatch):
    nodes = [_node("a", 1), _node("b", 2, gpus=1), _node("c", 2, gpus=1)]
    _cluster(monkeypatch, nodes)
    watch = cluster.NodeWatch(30.0, lambda: (2, 6), model_gpus=1.0)
    nodes[1]["Alive"] = False
    watch.poll(force=True)
    watch.check(last_progress=watch.lost_at - 100)  # the loss is newer than the last progress: no stop yet
    watch.lost_at -= 31
    with pytest.raises(cluster.NodeLost) as e:
        watch.check(last_progress=watch.lost_at)
    message = str(e.value)
    assert "lost 1 node(s) mid-run (10.0.0.1 id bbbbbbbb (2 CPUs, 1 GPUs))" in message
    assert "left: 2 node(s), 3 CPUs, 1 GPUs;" in message and "shrunk to nothing" not in message
    assert "2 of 6 shard(s)" in message and "rerun the same command to resume" in message
    nodes[2]["Alive"] = False
    watch.poll(force=True)
    assert "the cluster has shrunk to nothing (no node left has 1 GPU(s) and a CPU" in watch.message("x")


def test_node_watch_explains_a_graph_failure_after_a_loss(monkeypatch):
    nodes = [_node("a", 1), _node("b", 1)]
    _cluster(monkeypatch, nodes)
    watch = cluster.NodeWatch(30.0, lambda: (0, 3))

    def stream():
        yield None
        nodes[1]["Alive"] = False
        raise RuntimeError("ObjectLostError: gone")

    with pytest.raises(cluster.NodeLost, match=r"lost 1 node\(s\).*the graph failed \(RuntimeError: ObjectLostError"):
        list(watch.guard(stream()))
    nodes[1]["Alive"] = True
    watch = cluster.NodeWatch(30.0, lambda: (0, 3))

    def failing():
        yield None
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):  # no node lost: the error as it is
        list(watch.guard(failing()))


class _NotRay(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_job_client_names_what_is_wrong_with_the_address():
    from whisper_batch.jobs.submit import JobError, connect

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(JobError, match=r"answers \(GET .*HTTP 404\) but it is not a Ray job server.*8265"):
            connect(f"127.0.0.1:{server.server_address[1]}", timeout_s=5)
    finally:
        server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(JobError, match="cannot reach the Ray job server"):
        connect(f"http://127.0.0.1:{port}", timeout_s=5)
