"""The private torch APIs of model/torch_compat.py on the installed torch, and the fallbacks where they are missing.

Each private op is checked against its public equivalent; then its absence is simulated (the op removed, or made to
fail as a changed signature would) and the model must take the public path with the same results.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import whisper_batch.model.whisper as whisper_module
from whisper_batch.model.quantize import Int8Linear, quantize_int8
from whisper_batch.model.torch_compat import (
    int_mm,
    int_mm_works,
    pack_linear_weight,
    packed_linear,
    packing_works,
    version_counter,
)
from whisper_batch.model.whisper import LayerNorm, Whisper


def random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def no_mkldnn_ops(monkeypatch):
    """A torch without oneDNN's linear ops (``torch.ops.mkldnn`` has none of them)."""
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(), raising=False)


@pytest.fixture
def changed_linear_op(monkeypatch):
    """A torch whose ``_linear_pointwise`` takes other arguments: the reorder works, the packed linear raises."""

    def fails(*args, **kwargs):
        raise RuntimeError("mkldnn::_linear_pointwise() Expected a value of type 'str' for argument 'attr'")

    ops = types.SimpleNamespace(_reorder_linear_weight=torch.ops.mkldnn._reorder_linear_weight, _linear_pointwise=fails)
    monkeypatch.setattr(torch.ops, "mkldnn", ops, raising=False)


# --------------------------------------------------------------------------- oneDNN packed linear weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1,), (4,), (8,), (2, 750)], ids=["1", "4", "8", "2x750"])
def test_packed_linear_equals_linear(dtype, rows):
    """The shapes the model feeds it: a decoding step's few rows, an encoder's (batch, positions); with and without
    a bias. bf16 gives F.linear's bits (the model relies on that: tests/unit/test_model.py); fp32 within rounding."""
    if not packing_works(dtype):
        pytest.skip(f"this torch or CPU cannot pack {dtype} linear weights for oneDNN")
    w, b, x = random((96, 64), 0, dtype), random((96,), 1, dtype), random((*rows, 64), 2, dtype)
    packed = pack_linear_weight(w)
    assert packed is not None and packed.dtype == dtype
    for bias in (None, b):
        got, want = packed_linear(x, packed, bias), F.linear(x, w, bias)
        assert got.shape == want.shape == (*rows, 96)
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nothing_to_pack_off_the_cpu_or_in_other_dtypes():
    assert pack_linear_weight(random((8, 16), 0, torch.float16)) is None
    assert pack_linear_weight(random((8, 16), 0).to(torch.float64)) is None
    assert pack_linear_weight(torch.empty(8, 16, device="meta")) is None


@pytest.mark.parametrize("missing", ["no_mkldnn_ops", "changed_linear_op"])
@torch.no_grad()
def test_without_the_packing_ops_the_model_keeps_its_plain_weights(missing, request, random_model):
    plain = Whisper(random_model.dims).to(torch.bfloat16)
    plain.load_state_dict(random_model.state_dict())
    request.getfixturevalue(missing)
    assert not packing_works(torch.bfloat16) and pack_linear_weight(plain.decoder.token_embedding.weight) is None
    model = Whisper(random_model.dims).to(torch.bfloat16)
    model.load_state_dict(random_model.state_dict())
    assert model.pack_cpu_weights() is False  # nothing changes: every layer takes F.linear
    assert model.decoder.packed_projection is None and model.encoder.blocks[0].mlp[0].packed is None
    mel = random((1, 80, 3000), 3, torch.bfloat16)
    features = model.embed_audio(mel)
    assert torch.equal(features, plain.embed_audio(mel))
    tokens = torch.tensor([[50257, 440, 2068]])
    steps = [m.decode_step(tokens, m.new_cache(features)) for m in (model, plain)]
    assert torch.equal(*steps)


# --------------------------------------------------------------------------- torch._int_mm


@pytest.mark.parametrize("m, k, n", [(1, 64, 8), (8, 384, 384), (17, 1536, 40), (32, 32, 8)])
def test_int_mm_is_the_integer_product(m, k, n):
    """Exact where the float fallback is not: at K = 1536 (tiny.en's second MLP layer) a row's sum passes 2^24."""
    if not int_mm_works():
        pytest.skip("torch._int_mm does not run on this torch or CPU")
    g = torch.Generator().manual_seed(m * k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    got = int_mm(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, (a.long() @ b.long()).int())


def test_int8_layers_fall_back_to_float_products_without_int_mm(monkeypatch, make_random_whisper, tiny_dims,
                                                               tiny_en_tokenizer):
    model = make_random_whisper(tiny_dims, tiny_en_tokenizer.eot)
    tokens, mel = torch.tensor([[50257, 440, 2068]]), random((1, 80, 3000), 4)
    import whisper_batch.model.quantize as quantize

    with_int_mm = int_mm_works()
    monkeypatch.delattr(torch, "_int_mm", raising=False)
    monkeypatch.setattr(quantize, "dynamic_int8_works", lambda: False)  # nor torch's dynamic int8 linear
    assert not int_mm_works()
    quantize_int8(model)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(layer.kernel == "float" for layer in layers)
    with torch.no_grad():
        fallback = model.logits(tokens, model.embed_audio(mel))
    assert fallback.isfinite().all()
    if with_int_mm:  # the same model on the integer path: the same numbers up to float rounding
        monkeypatch.undo()
        for layer in layers:
            layer.kernel = "int_mm"
        with torch.no_grad():
            exact = model.logits(tokens, model.embed_audio(mel))
        torch.testing.assert_close(fallback, exact, atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------- Tensor._version


def test_version_counter_changes_with_every_in_place_change():
    t = torch.zeros(3)
    before = version_counter(t)
    assert version_counter(t) == before
    t.add_(1)
    assert version_counter(t) != before
    with torch.no_grad():
        p = torch.nn.Parameter(torch.zeros(3))
        seen = version_counter(p)
        p.copy_(torch.ones(3))  # as load_state_dict does
    assert version_counter(p) != seen


class NoVersion(torch.Tensor):
    """A tensor as a torch without version counters would have it."""

    @property
    def _version(self):
        raise AttributeError("_version")


def test_without_version_counters_layer_norms_convert_their_parameters_every_call(monkeypatch):
    t = torch.zeros(2).as_subclass(NoVersion)
    assert version_counter(t) != version_counter(t)  # never the same: a cache keyed on it is never reused
    monkeypatch.setattr(whisper_module, "version_counter", lambda p: version_counter(p.detach().as_subclass(NoVersion)))
    ln = LayerNorm(8).to(torch.bfloat16)
    x = random((2, 8), 5, torch.bfloat16)
    first = ln.float_params()
    assert ln.float_params()[0] is not first[0]  # converted again on every call
    with torch.no_grad():
        ln.weight.copy_(torch.arange(8.0))
    want = F.layer_norm(x.float(), (8,), ln.weight.float(), ln.bias.float()).to(torch.bfloat16)
    assert torch.equal(ln(x), want)
