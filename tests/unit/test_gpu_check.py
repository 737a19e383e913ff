"""`make gpu-check`'s CPU self-test: the same entry point as the GPU machine's command (``python -m
benchmarks.gpu_check --bundle DIR``), on a small bundle written by ``benchmarks.gpu_bundle``, tiny shapes, on the CPU
(issue 16, item 4; issue 27, part 3)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_bundle
from benchmarks.gpu_check import (
    SELF_TEST,
    StaticStep,
    decode_eager,
    decode_static,
    main,
    random_model,
    word_errors,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle as the GPU machine gets one (both parts, the real tiny.en, wheels), with 2 rows of examples/."""
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    gpu_bundle.build(out, {"examples": REPO / "examples" / "manifest.jsonl"}, rows=2, echo=lambda m: None)
    return out


def test_self_test_runs_every_check_without_failures(bundle, tmp_path, capsys):
    report = tmp_path / "gpu.json"
    assert main(["--self-test", "--budget-s", "60", "--bundle", str(bundle), "--json", str(report)]) == 0
    out = json.loads(report.read_text())
    rows = out["rows"]
    assert not out["failed"] and not [r for r in rows if r["result"].startswith("FAILED")], rows
    assert {"CUDA tests", "static step", "dev set", "shapes", "HF transformers generate"} <= {r["check"] for r in rows}
    shapes = [r for r in rows if r["check"] == "shapes"]
    assert any("eager decode_step" in r["setting"] for r in shapes)
    assert any("static cache" in r["setting"] for r in shapes)
    assert all(r["result"].startswith("RTFx ") for r in shapes)
    [dev] = [r for r in rows if r["check"] == "dev set"]
    assert "over 2 rows" in dev["result"] and "vs CPU fp32" in dev["result"], dev
    [tests] = [r for r in rows if r["check"] == "CUDA tests"]
    assert "collected" in tests["result"], tests  # the gpu tests' files collect (the bundle's openai-whisper)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("device ") and printed[1].startswith(f"bundle {bundle}")  # versions, bundle
    assert "| check | setting | result | s |" in printed


def test_the_bundle_fits_and_holds_the_packaged_model_bit_for_bit(bundle):
    from whisper_batch.model.checkpoint import load_checkpoint

    sizes = gpu_bundle.part_sizes(bundle)
    assert all(0 < n <= gpu_bundle.MAX_MIB * gpu_bundle.MiB for n in sizes.values()), sizes
    b = gpu_bundle.Bundle(bundle)
    assert not b.missing()
    gpu_bundle.check_model(load_checkpoint(None), b)  # every tensor, the heads, the suppressed tokens
    [rows] = b.sets().values()
    assert [r["id"] for r in rows] == ["fox", "weather"]
    assert all(r["audio"].dtype == np.float32 and len(r["audio"]) == r["samples"] for r in rows)
    assert {w.split("-")[0] for w in b.index["wheels"]} == {"more_itertools", "openai_whisper", "whisper_normalizer"}


def test_a_missing_part_is_named(bundle, tmp_path):
    # the GPU machine went back between the two calls: part a is gone, and the check says what to carry
    copy = tmp_path / "bundle"
    shutil.copytree(bundle / "b", copy / "b")
    b = gpu_bundle.Bundle(copy)
    assert b.missing() and all(m.startswith("a/") for m in b.missing())
    with pytest.raises(FileNotFoundError, match="carry .gpu-bundle/a"):
        b.sets()


def test_audio_planes_are_lossless():
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.integers(-32768, 32767, 5000), [32767, -32768, 32767, 0]]).astype(np.int16)
    planes = gpu_bundle.encode_audio(samples)
    assert np.array_equal(gpu_bundle.decode_audio_planes(planes["lo"], planes["hi"]), samples)


def test_hf_names_invert_the_loaders_renaming():
    from whisper_batch.model.checkpoint import reference_keys
    from whisper_batch.model.hf_checkpoint import hf_to_reference

    sd = {k: torch.zeros(1) for k in reference_keys(SELF_TEST)}
    assert hf_to_reference(gpu_bundle.hf_names(sd), "x").keys() == sd.keys()


@pytest.mark.parametrize("ref, hyp", [("a b c d", "a x c d"), ("a b c", "a c"), ("a b", "a b c d"), ("", "a"),
                                      ("the cat sat on the mat", "cat sat on mat the"), ("a b", "")])
def test_word_errors_are_jiwers(ref, hyp):
    jiwer = pytest.importorskip("jiwer")
    if not ref:
        assert word_errors([], hyp.split()) == len(hyp.split())
        return
    o = jiwer.process_words(ref, hyp)
    assert word_errors(ref.split(), hyp.split()) == o.substitutions + o.deletions + o.insertions


@torch.no_grad()
def test_static_decoding_gives_the_tokens_of_decode_step():
    # the static-cache loop (what a CUDA graph replays) against the model's own cached decoding, greedy
    model = random_model(SELF_TEST, "cpu", torch.float32, seed=1)
    feats = model.embed_audio(torch.randn(2, SELF_TEST.n_mels, 2 * SELF_TEST.n_audio_ctx))
    eager, static = decode_eager(model, feats, 5, 7), decode_static(model, feats, 5, 7, graph=False)
    assert eager.shape == (2, 5) and torch.equal(eager, static)
    step = StaticStep(model, feats, max_len=6)
    d = SELF_TEST
    assert step.k.shape == (d.n_text_layer, 2, d.n_text_head, 6, d.n_text_state // d.n_text_head)
