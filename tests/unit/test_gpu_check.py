"""`make gpu-check`'s CPU self-test: the same functions as on a GPU, tiny shapes, on the CPU (issue 16, item 4)."""

import torch

from benchmarks.gpu_check import SELF_TEST, StaticStep, check, decode_eager, decode_static, random_model


def test_self_test_runs_every_check_without_failures():
    lines = []
    report = check(self_test=True, budget_s=60, echo=lines.append)
    checks = {c for c, _, _, _ in report.rows}
    assert {"CUDA tests", "static step", "dev set", "shapes", "HF transformers generate"} <= checks
    failed = [r for r in report.rows if r[2].startswith("FAILED")]
    assert not failed, failed
    shapes = [r for r in report.rows if r[0] == "shapes"]
    assert any("eager decode_step" in s for _, s, _, _ in shapes)
    assert any("static cache" in s for _, s, _, _ in shapes)
    assert all(r.startswith("RTFx ") for _, _, r, _ in shapes)
    assert "| check | setting | result | s |" in report.table("header")
    assert lines[0].startswith("device ")  # the versions line comes first


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
