"""Plan: shard boundaries, fingerprint, duplicate ids, extra types, blocks, resume checks, run records."""

import json
from pathlib import Path

import pytest

from tests.shards import write_shard
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.manifest import ManifestError
from whisper_batch.pipeline.plan import (
    Plan,
    PlanMismatch,
    build_plan,
    check_resume,
    finish_run,
    iter_blocks,
    merge_kinds,
    start_run,
)


def write_manifest(path, n, **extra_per_row):
    rows = [{"audio_filepath": f"a/{i}.wav", "id": f"u{i}", "text": f"t{i}",
             **{k: f(i) for k, f in extra_per_row.items()}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_with(shard_size, *more):
    return load_config(None, [f"manifest.shard_size={shard_size}", *more])


def test_shards_when_rows_not_a_multiple(tmp_path):
    plan = build_plan(write_manifest(tmp_path / "m.jsonl", 10), cfg_with(4))
    assert (plan.n_rows, plan.shard_size, plan.n_shards) == (10, 4, 3)
    assert [plan.shard_of(i) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert list(plan.shard_rows(2)) == [8, 9]
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_exact_multiple_and_single_shard(tmp_path):
    assert build_plan(write_manifest(tmp_path / "m.jsonl", 8), cfg_with(4)).n_shards == 2
    assert build_plan(write_manifest(tmp_path / "m.jsonl", 3), cfg_with(256)).n_shards == 1


def test_empty_manifest_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="has no rows"):
        build_plan(str(tmp_path / "m.jsonl"), cfg_with(4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no files ending in"):
        build_plan(str(tmp_path / "empty"), cfg_with(4))


def test_fingerprint_stable_and_sensitive(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 5)
    first = build_plan(path, cfg_with(2)).fingerprint
    assert build_plan(path, cfg_with(2)).fingerprint == first
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    for i, change in enumerate([("t3", "t3!"), ('"u1"', '"u1b"'), ("a/4.wav", "a/4b.wav")]):
        edited = lines.copy()
        idx = [j for j, line in enumerate(edited) if change[0] in line][0]
        edited[idx] = edited[idx].replace(*change)
        (tmp_path / f"m{i}.jsonl").write_text("\n".join(edited) + "\n")
        assert build_plan(str(tmp_path / f"m{i}.jsonl"), cfg_with(2)).fingerprint != first


def test_duplicate_ids_named(tmp_path):
    rows = [{"audio_filepath": f"{i}.wav", "id": f"u{i % 7}"} for i in range(10)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError) as err:
        build_plan(str(tmp_path / "m.jsonl"), cfg_with(4))
    message = str(err.value)
    assert "3 duplicated id(s)" in message and "'u0' (rows 0, 7)" in message and "'u2' (rows 2, 9)" in message


def test_extra_types_inferred(tmp_path):
    values = {
        "count": lambda i: i,
        "x": lambda i: i if i % 2 else i + 0.5,
        "flag": lambda i: bool(i % 2),
        "mixed": lambda i: i if i else "zero",
        "maybe": lambda i: None if i < 3 else 1.5,
        "obj": lambda i: {"k": i},
    }
    plan = build_plan(write_manifest(tmp_path / "m.jsonl", 5, **values), cfg_with(2))
    assert plan.extra_types == {"count": "int64", "x": "float64", "flag": "bool", "mixed": "string",
                                "maybe": "float64", "obj": "string"}
    assert merge_kinds(set()) == "string" and merge_kinds({"bool", "int64"}) == "string"


def test_blocks_hold_exactly_the_pending_shards(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 23)
    plan = build_plan(path, cfg_with(3))  # 8 shards, the last one with 2 rows
    blocks = list(iter_blocks(path, plan, {1, 2, 5, 7, 6}, shards_per_block=2))
    assert [shards for shards, _ in blocks] == [[1, 2], [5, 6], [7]]
    for shards, records in blocks:
        expected = [i for s in shards for i in plan.shard_rows(s)]
        assert [r["row_index"] for r in records] == expected
        assert all(r["shard_id"] == plan.shard_of(r["row_index"]) for r in records)
    assert list(iter_blocks(path, plan, set(), 2)) == []
    with pytest.raises(ValueError, match="outside the plan"):
        list(iter_blocks(path, plan, {8}, 2))


def test_resume_fresh_then_done_shards(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 7)
    cfg = cfg_with(3)
    plan = build_plan(path, cfg)
    layout = RunLayout(str(tmp_path / "out"))
    state = check_resume(layout, plan, cfg)
    assert state.fresh and state.pending == [0, 1, 2] and state.done == []
    invocation = start_run(layout, plan, cfg, "tiny.en")
    _, records = next(iter_blocks(path, plan, [1], 1))
    write_shard(layout, 1, records, plan.extra_types, "tiny.en")
    # a data file without a completion record is not done (crash between the two writes)
    write_shard(layout, 2, [], plan.extra_types, "tiny.en")
    (tmp_path / "out" / "shards" / "00002.json").unlink()
    state = check_resume(layout, plan, cfg)
    assert not state.fresh and state.done == [1] and state.pending == [0, 2]
    stats = finish_run(layout, invocation)
    assert stats["shards_done"] == 1 and stats["rows_done"] == 3
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_done"] == 3


def test_resume_refuses_changed_manifest(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 6)
    cfg = cfg_with(3)
    layout = RunLayout(str(tmp_path / "out"))
    start_run(layout, build_plan(path, cfg), cfg, "tiny.en")
    write_manifest(tmp_path / "m.jsonl", 7)
    with pytest.raises(PlanMismatch) as err:
        check_resume(layout, build_plan(path, cfg), cfg)
    message = str(err.value)
    assert "manifest changed" in message and "use a new -o OUTPUT" in message and "to start over" in message


def test_resume_refuses_shard_size_and_results_config(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 6)
    cfg = cfg_with(3)
    layout = RunLayout(str(tmp_path / "out"))
    start_run(layout, build_plan(path, cfg), cfg, "tiny.en")
    with pytest.raises(PlanMismatch, match="shard_size is 2 but .* started with 3"):
        check_resume(layout, build_plan(path, cfg_with(2)), cfg_with(2))
    changed = cfg_with(3, "decode.beam_size=5", "decode.language=en")
    with pytest.raises(PlanMismatch, match=r"decode.beam_size: None -> 5, decode.language: None -> 'en'"):
        check_resume(layout, build_plan(path, changed), changed)
    # the resolved model name stands in for model.name when given
    named = cfg_with(3, "model.name=tiny.en")
    assert check_resume(layout, build_plan(path, named), named, model_name="tiny.en").pending == [0, 1]
    with pytest.raises(PlanMismatch, match="model.name: 'tiny.en' -> 'base'"):
        check_resume(layout, build_plan(path, named), named, model_name="base")
    # a run stored before decode.padding_step_seconds existed ran with 5 s steps: it resumes with them, not others
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    del run["results_config"]["decode.padding_step_seconds"]
    (tmp_path / "out" / "run.json").write_text(json.dumps(run))
    assert check_resume(layout, build_plan(path, cfg), cfg).pending == [0, 1]
    finer = cfg_with(3, "decode.padding_step_seconds=1")
    with pytest.raises(PlanMismatch, match=r"decode.padding_step_seconds: 5.0 -> 1.0"):
        check_resume(layout, build_plan(path, finer), finer)
    # throughput knobs may change between invocations
    faster = cfg_with(3, "ray.model_actors=4", "model.batch_size=64")
    assert check_resume(layout, build_plan(path, faster), faster).pending == [0, 1]


def test_with_30_s_passes_the_padding_step_is_no_results_setting(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 4)
    reference = cfg_with(2, "decode.padding_seconds=null")
    layout = RunLayout(str(tmp_path / "out"))
    start_run(layout, build_plan(path, reference), reference, "tiny.en")
    stored = json.loads((tmp_path / "out" / "run.json").read_text())["results_config"]
    assert "decode.padding_step_seconds" not in stored
    other = cfg_with(2, "decode.padding_seconds=null", "decode.padding_step_seconds=3")
    assert check_resume(layout, build_plan(path, other), other).pending == [0, 1]


def test_run_json_written_once_without_secrets(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", 4)
    cfg = cfg_with(2, "storage.storage_options={key: AKIAXXXX, secret: hunter2}")
    layout = RunLayout(str(tmp_path / "out"))
    plan = build_plan(path, cfg)
    start_run(layout, plan, cfg, "tiny.en")
    first = (tmp_path / "out" / "run.json").read_text()
    start_run(layout, plan, cfg, "tiny.en")
    assert (tmp_path / "out" / "run.json").read_text() == first
    assert "AKIAXXXX" not in first and "hunter2" not in first
    run = json.loads(first)
    assert run["manifest_fingerprint"] == plan.fingerprint and run["model"] == "tiny.en"
    assert run["plan"]["n_shards"] == 2 and "pyarrow" in run["versions"]
    assert len(list((tmp_path / "out" / "invocations").iterdir())) == 2
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["fingerprint"] == plan.fingerprint


EVAL_MANIFEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval" / "manifest.jsonl"


def test_plan_of_the_shared_eval_manifest():
    if not EVAL_MANIFEST.exists():
        pytest.skip(f"shared eval data not found at {EVAL_MANIFEST}")
    plan = build_plan(str(EVAL_MANIFEST), cfg_with(16))
    assert plan.n_rows == 46 and plan.n_shards == 3
    assert plan.extra_types == {"source": "string", "dataset": "string"}
    _, records = next(iter_blocks(str(EVAL_MANIFEST), plan, [0], 1))
    assert all(Path(r["uri"]).is_file() for r in records)  # relative paths resolved against the manifest folder


def test_a_run_started_on_the_reference_windows_is_told_how_to_resume(tmp_path):
    """A run started before the defaults' shorter encoder passes (every pass 30 s) resumes with
    configs/reference.yaml, which gives it its values again; the refusal says so."""
    from pathlib import Path

    reference = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "reference.yaml"),
                            ["manifest.shard_size=3"])
    path = write_manifest(tmp_path / "m.jsonl", 6)
    layout = RunLayout(str(tmp_path / "out"))
    start_run(layout, build_plan(path, reference), reference, "tiny.en")
    with pytest.raises(PlanMismatch, match=r"decode.padding_seconds: None -> 5.0.*--config configs/reference.yaml"):
        check_resume(layout, build_plan(path, cfg_with(3)), cfg_with(3))
    assert check_resume(layout, build_plan(path, reference), reference).pending == [0, 1]
