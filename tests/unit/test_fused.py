"""The fused int8 operators (model/fused.py): compiled, they give their eager twins' bits; where compiling fails (no
C++ compiler, a cache folder that cannot be made) the eager twin runs with one warning; actors compiling into one
shared cache at once both get the compiled kernels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from whisper_batch.model.fused import Fused, quantize_rows, rescale
from whisper_batch.model.quantize import Int8Linear
from whisper_batch.model.torch_compat import int_mm_works

REPO = Path(__file__).resolve().parents[2]

# run in a fresh interpreter: quantise and rescale one batch through fresh Fused operators, print what happened
CHILD = """
import json, logging, torch
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from whisper_batch.model.fused import Fused, quantize_rows, rescale
q, r = Fused(quantize_rows), Fused(rescale)
x = torch.linspace(-3, 5, 96).reshape(4, 24)
codes, scale = q(x)
y = r(codes.int(), scale, torch.full((24,), 0.5), torch.ones(24), torch.float32)
print(json.dumps({"failed": [q.failed, r.failed], "codes": codes.tolist(), "y": y.tolist()}))
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment, with the checkout importable, for a fresh interpreter."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}


def _child(env_extra: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD], env=_env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Whether torch.compile works on this machine, asked of fresh interpreters as model actors ask it: a long pytest
    process that has run the whole suite in-process is not what the product compiles in. Two of them, started
    together on one new cache folder, as two actors of a node compile into one cache at once; yields what each
    printed and wrote to stderr."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor") / "shared")}
    results = [_result(p) for p in [_child(env) for _ in range(2)]]
    if all(got["failed"] == [True, True] for got, _ in results):
        why = results[0][1].strip().splitlines()[-1:]
        pytest.skip(f"torch.compile does not work here ({why}): the eager twins are what runs")
    yield results


def test_compiled_checks_pass_in_a_fresh_interpreter(compiled):
    """The checks below named ``check_*`` compile in-process, so they run in a fresh interpreter, as the model actors
    compile: each must pass there, none skipped."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o",
                           "python_functions=check_*", __file__], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b5 passed\b", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def check_compiled_operators_give_the_eager_bits(dtype):
    g = torch.Generator().manual_seed(0)
    q, r = Fused(quantize_rows), Fused(rescale)
    for rows in (1, 7, 300):  # one compiled kernel for every batch (dynamic shapes), rows of one included
        x = (torch.randn(rows, 384, generator=g) * torch.rand(rows, 1, generator=g) * 10).to(dtype)
        x[0, :5] = 0  # zeros and a row's maximum at both signs
        codes, scale = q(x)
        ref_codes, ref_scale = quantize_rows(x)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        acc = torch.randint(-(2**20), 2**20, (rows, 96), generator=g, dtype=torch.int32)
        w_scale, bias = torch.rand(96, generator=g), torch.randn(96, generator=g)
        for b in (bias, None):
            assert torch.equal(r(acc, scale, w_scale, b, dtype), rescale(acc, scale, w_scale, b, dtype))
    assert not q.failed and not r.failed and q.compile_s > 0


def check_an_int8_layer_gives_the_same_bits_fused_or_not():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(64, 48, generator=g), torch.randn(64, generator=g)
    kernel = "int_mm" if int_mm_works() else "float"  # the kernels the fused loops serve ("dynamic" quantises in torch)
    eager, fused = Int8Linear(w, b, kernel), Int8Linear(w, b, kernel, fused=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 48, generator=g).to(dtype)
        y = fused(x)
        assert y.dtype == dtype and y.shape == (2, 5, 64) and torch.equal(y, eager(x))


def _expected() -> dict:
    """What CHILD prints, computed here by the eager twins."""
    x = torch.linspace(-3, 5, 96).reshape(4, 24)
    codes, scale = quantize_rows(x)
    y = rescale(codes.int(), scale, torch.full((24,), 0.5), torch.ones(24), torch.float32)
    return {"codes": codes.tolist(), "y": y.tolist()}


def test_without_a_compiler_or_a_cache_folder_the_eager_twin_runs_with_one_warning(compiled, tmp_path):
    expected = _expected()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = {
        "no compiler": {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c1")},
        "cache folder under a file": {"TORCHINDUCTOR_CACHE_DIR": str(blocker / "cache")},
    }
    procs = {name: _child(env) for name, env in cases.items()}
    for name, proc in procs.items():
        got, err = _result(proc)
        assert got["failed"] == [True, True], (name, err[-2000:])
        assert got["codes"] == expected["codes"] and got["y"] == expected["y"], name  # the eager twin's numbers
        warnings = [line for line in err.splitlines() if line.startswith("WARNING") and "torch.compile" in line]
        assert len(warnings) == 2 and all("running it eagerly" in w for w in warnings), (name, err[-2000:])


def test_actors_compiling_into_one_cache_at_once_both_get_the_compiled_kernels(compiled):
    expected = _expected()
    for got, err in compiled:  # the two started together on one new cache folder (the fixture)
        assert got["failed"] == [False, False], err[-2000:]
        assert "WARNING" not in err, err[-2000:]
        assert got["codes"] == expected["codes"] and got["y"] == expected["y"]


def check_the_model_stage_in_int8_gives_the_same_rows_compiled_or_not(caplog):
    """The pipeline's model stage with model.quantize=int8 in a bf16 model (the real tiny.en, the example speech):
    compiled operators (model.compile, the default) and eager ones give the same texts and segments."""
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.features import Featurizer
    from whisper_batch.pipeline.manifest import read_manifest
    from whisper_batch.pipeline.transcriber import Transcriber

    rows = [{"uri": r.uri, "audio_filepath": r.audio_filepath, "offset": r.offset, "duration": r.duration,
             "language": r.language, "row_index": r.index, "shard_id": 0}
            for r in read_manifest(str(REPO / "examples" / "manifest.jsonl"))]
    out = {}
    for compile_ in (True, False):
        cfg = load_config(None, ["model.quantize=int8", "model.dtype=bfloat16", f"model.compile={compile_}"])
        transcriber = Transcriber(cfg)
        items = Featurizer(cfg, transcriber.n_mels).featurize_rows(rows)
        out[compile_] = [(r["text"], r["segments"]) for r in transcriber.transcribe_rows(items)]
    assert len(out[True]) == len(rows) and all(text.strip() for text, _ in out[True])
    assert out[True] == out[False]
    assert "running it eagerly" not in caplog.text


def check_after_the_warm_up_model_calls_compile_nothing_more():
    """warm_up compiles every kernel a bf16 model calls; batches of any size, views among them (a layer's input is
    sometimes a view of the attention's output), then run those kernels without compiling again."""
    from torch._dynamo.utils import counters

    from whisper_batch.model.fused import fused_quantize_rows, fused_rescale, warm_up

    warm_up(torch.bfloat16)
    before = dict(counters["stats"])
    with torch.no_grad():
        for rows in (1, 2, 7, 300):
            x = torch.randn(rows, 6, 1, 64).to(torch.bfloat16).transpose(1, 2).reshape(rows, 1, 384)  # a view
            for inp in (x.reshape(-1, 384), torch.randn(rows, 1536).to(torch.bfloat16)):
                codes, scale = fused_quantize_rows(inp)
                acc = torch.ones(rows, 96, dtype=torch.int32)
                fused_rescale(acc, scale, torch.ones(96), torch.zeros(96), torch.bfloat16)
                fused_rescale(acc, scale, torch.ones(96), None, torch.bfloat16)
    assert dict(counters["stats"]) == before, (before, dict(counters["stats"]))
