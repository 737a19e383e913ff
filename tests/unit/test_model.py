"""The network and its kv-cache (model/whisper.py, model/kv_cache.py) against the reference and against themselves.

A tiny random model (2 layers, 64 wide, real contexts and vocabulary) shares one state dict with the reference
``whisper.model.Whisper``; the cached, incremental and reordered paths must equal an uncached forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from whisper_batch.model.checkpoint import decode_alignment_heads
from whisper_batch.model.dims import ModelDimensions
from whisper_batch.model.kv_cache import KVCache
from whisper_batch.model.transcribe import transcribe_windows
from whisper_batch.model.whisper import ATTENTION_CHUNK, Whisper, attention, chunked_attention, sinusoids

whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")

ATOL = 1e-4
# the kv-cache tests run on the CPU, and on a CUDA device where there is one (`pytest -m gpu`, `make gpu-check`)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


def random_mel(n: int, seed: int = 1, n_mels: int = 80, frames: int = 3000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_mels, frames, generator=g) * 0.5


def random_tokens(rows: int, length: int, seed: int = 2, high: int = 50000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (rows, length), generator=g)


@pytest.fixture(scope="module")
def features(random_model) -> torch.Tensor:
    """Encoder output of 3 random windows: (3, 1500, 64)."""
    with torch.no_grad():
        return random_model.embed_audio(random_mel(3))


@pytest.fixture(scope="module")
def copies() -> dict:
    return {}


@pytest.fixture
def on_device(random_model, features, copies, monkeypatch):
    """``on_device(device)``: (the random model, ``features``) on ``device``, fp32; off the CPU a copy, made once,
    and without TF32 (cuDNN's convolutions take it by default), so that the CPU's tolerances hold."""

    def get(device: str) -> tuple[Whisper, torch.Tensor]:
        if device == "cpu":
            return random_model, features
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        if device not in copies:
            copies[device] = copy.deepcopy(random_model).to(device), features.to(device)
        return copies[device]

    return get


# --------------------------------------------------------------------------- parity with the reference


def test_state_dict_names_match_reference_both_ways(random_setup, reference_of):
    model, _ = random_setup
    ref = reference_of(model)  # loads our state dict strictly
    assert set(ref.state_dict()) == set(model.state_dict())
    fresh = Whisper(model.dims)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@torch.no_grad()
def test_encoder_and_logits_match_reference(random_setup, reference_of):
    model, tokenizer = random_setup
    ref = reference_of(model)
    mel = random_mel(2, seed=5)
    ours_audio, ref_audio = model.embed_audio(mel), ref.embed_audio(mel)
    torch.testing.assert_close(ours_audio, ref_audio, atol=ATOL, rtol=0)
    tokens = torch.tensor([[tokenizer.sot, *tokenizer.encode(" hello world, this is a test")]] * 2)
    ours = model.logits(tokens, ours_audio)
    assert ours.shape == (2, tokens.shape[1], model.dims.n_vocab) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.logits(tokens, ref_audio), atol=ATOL, rtol=0)
    torch.testing.assert_close(model(mel, tokens), ours, atol=ATOL, rtol=0)


def test_sinusoids_match_reference():
    torch.testing.assert_close(sinusoids(1500, 64), whisper.model.sinusoids(1500, 64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="even number of channels"):
        sinusoids(10, 7)


def test_alignment_heads_from_reference_dump(make_random_whisper, tiny_en_tokenizer):
    dims = ModelDimensions(80, 1500, 96, 6, 4, 51864, 448, 96, 6, 4)  # tiny.en's layers and heads
    ours = make_random_whisper(dims, tiny_en_tokenizer.eot)
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**dims.to_dict()))
    dump = whisper._ALIGNMENT_HEADS["tiny.en"]
    ours.set_alignment_heads(decode_alignment_heads(dump, dims))
    ref.set_alignment_heads(dump)
    assert torch.equal(ours.alignment_heads, ref.alignment_heads.to_dense())
    ours.set_alignment_heads([(1, 0), (3, 5)])
    assert ours.alignment_heads.nonzero().tolist() == [[1, 0], [3, 5]]


# --------------------------------------------------------------------------- the kv-cache


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_incremental_decoding_equals_full_forward(on_device, device):
    model, features = on_device(device)
    tokens = random_tokens(3, 12).to(device)
    full = model.logits(tokens, features)  # (3, 12, V)
    cache = model.new_cache(features, group=1, max_len=16)
    steps = [model.decode_step(tokens[:, :5], cache)]  # a 5-token prefix at once ...
    assert cache.length == 5
    for t in range(5, 12):  # ... then token by token
        steps.append(model.decode_step(tokens[:, t : t + 1], cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_cache_group_shares_cross_attention_between_rows(on_device, device):
    """group=3 rows per audio (cross K/V stored once per audio) == each audio repeated 3 times with group=1."""
    model, features = on_device(device)
    tokens = random_tokens(9, 6, seed=3).to(device)
    grouped = model.new_cache(features, group=3)
    assert grouped.cross_k.shape[1] == 3 and grouped.n_rows == 9
    repeated = model.new_cache(features.repeat_interleave(3, dim=0), group=1)
    a = model.decode_step(tokens, grouped)
    b = model.decode_step(tokens, repeated)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(a, model.logits(tokens, features), atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_reorder_equals_rerunning_reordered_tokens(on_device, device):
    model, features = on_device(device)
    audio = features[:2]
    tokens = random_tokens(6, 7, seed=4).to(device)  # 2 audios x 3 beams
    cache = model.new_cache(audio, group=3)
    model.decode_step(tokens[:, :4], cache)
    rows = torch.tensor([2, 0, 0, 4, 5, 3], device=device)  # beams never move between audios
    cache.reorder(rows)
    history = torch.cat([tokens[rows, :4], tokens[:, 4:5]], dim=1)
    got = model.decode_step(tokens[:, 4:5], cache)[:, -1]
    torch.testing.assert_close(got, model.logits(history, audio)[:, -1], atol=ATOL, rtol=0)
    rows = torch.tensor([1, 1, 2, 3, 3, 3], device=device)  # a second reorder, one step later
    cache.reorder(rows)
    history = torch.cat([history[rows], tokens[:, 5:6]], dim=1)
    got = model.decode_step(tokens[:, 5:6], cache)[:, -1]
    torch.testing.assert_close(got, model.logits(history, audio)[:, -1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_reorder_matches_reference_logits(random_model, features, reference_of):
    ref = reference_of(random_model)
    tokens = random_tokens(4, 6, seed=6)  # 2 audios x 2 beams
    cache = random_model.new_cache(features[:2], group=2)
    random_model.decode_step(tokens[:, :5], cache)
    rows = torch.tensor([1, 1, 3, 2])
    cache.reorder(rows)
    got = random_model.decode_step(tokens[:, 5:6], cache)[:, -1]
    history = torch.cat([tokens[rows, :5], tokens[:, 5:6]], dim=1)
    expected = ref.logits(history, features[:2].repeat_interleave(2, dim=0))[:, -1]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_keep_audios_keeps_the_right_rows(on_device, device):
    model, features = on_device(device)
    tokens = random_tokens(6, 6, seed=7).to(device)  # 3 audios x 2 rows
    cache = model.new_cache(features, group=2, max_len=8)
    model.decode_step(tokens[:, :5], cache)
    before_k, before_cross = cache.self_k.clone(), cache.cross_k.clone()
    cache.keep_audios(torch.tensor([2, 0], device=device))
    rows = torch.tensor([4, 5, 0, 1], device=device)
    assert cache.n_rows == 4 and cache.length == 5 and cache.max_len == 8
    assert torch.equal(cache.self_k[:, :, :, :5], before_k[:, rows, :, :5])
    assert torch.equal(cache.cross_k, before_cross[:, [2, 0]])
    got = model.decode_step(tokens[rows, 5:6], cache)[:, -1]
    expected = model.logits(tokens[rows], features[[2, 0]])[:, -1]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_audios_of_several_encoder_lengths_share_a_cache_each_seeing_its_own_positions(random_model, dtype):
    """Features of 1500, 750 and 250 positions zero-padded into one batch with their lengths: every row's logits,
    through the prompt, steps and a compaction, equal those of its audio decoded alone at its own length."""
    model = copy.deepcopy(random_model).to(dtype)
    lengths = [1500, 1500, 750, 250, 250]
    alone = [model.embed_audio(random_mel(1, seed=10 + k, frames=2 * n).to(dtype)) for k, n in enumerate(lengths)]
    padded = torch.zeros(len(lengths), 1500, alone[0].shape[2], dtype=dtype)
    for k, (f, n) in enumerate(zip(alone, lengths)):
        padded[k, :n] = f[0]
        padded[k, n:] = float("nan")  # nothing may read the padding
    tokens = random_tokens(2 * len(lengths), 8, seed=11)  # 2 rows per audio
    cache = model.new_cache(padded, group=2, max_len=8, lengths=lengths)
    assert cache.cross_runs == [(0, 2, 1500), (2, 3, 750), (3, 5, 250)]
    steps = [model.decode_step(tokens[:, :5], cache), model.decode_step(tokens[:, 5:6], cache)]
    cache.keep_audios(torch.tensor([0, 2, 4]))  # drops one audio of 1500 and one of 250
    assert cache.cross_lengths == [1500, 750, 250] and cache.cross_runs == [(0, 1, 1500), (1, 2, 750), (2, 3, 250)]
    rows = torch.tensor([0, 1, 4, 5, 8, 9])
    last = model.decode_step(tokens[rows, 6:7], cache)
    tol = dict(atol=ATOL, rtol=0) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for k, f in enumerate(alone):
        own = model.new_cache(f, group=2, max_len=8)
        mine = slice(2 * k, 2 * k + 2)
        expected = torch.cat([model.decode_step(tokens[mine, :5], own), model.decode_step(tokens[mine, 5:6], own)], 1)
        torch.testing.assert_close(torch.cat([s[mine] for s in steps], dim=1), expected, **tol)
        if k in (0, 2, 4):
            j = [0, 2, 4].index(k)
            torch.testing.assert_close(last[2 * j : 2 * j + 2], model.decode_step(tokens[mine, 6:7], own), **tol)


def test_lengths_must_match_the_audios(random_model, features):
    with pytest.raises(ValueError, match="2 lengths given for 3 audios"):
        random_model.new_cache(features, lengths=[1500, 750])


@torch.no_grad()
def test_cache_overflow_is_an_error(random_model, features):
    cache = random_model.new_cache(features[:1], max_len=4)
    random_model.decode_step(random_tokens(1, 3), cache)
    with pytest.raises(RuntimeError, match="kv-cache overflow: 5 positions > preallocated 4"):
        random_model.decode_step(random_tokens(1, 2), cache)


def test_allocate_shapes():
    cache = KVCache.allocate(n_layer=2, n_rows=6, n_head=4, d_head=16, max_len=10, group=3)
    assert cache.self_k.shape == (2, 6, 4, 10, 16) and cache.n_rows == 6 and cache.max_len == 10
    assert cache.length == 0 and cache.group == 3 and cache.cross_k is None


@torch.no_grad()
@pytest.mark.parametrize("frames", [3000, 1600, 200])
def test_trimmed_window_encodes_as_the_reference_with_fewer_positions(random_setup, reference_of, frames):
    """A window cut to ``frames`` mel frames (its padding trimmed) is encoded as the reference encodes it with its
    positional embedding cut to ``frames // 2`` positions (whisper.cpp's audio_ctx)."""
    model, _ = random_setup
    ref = reference_of(model)  # shared by the session's tests: its embedding is put back below
    full = ref.encoder.positional_embedding
    ref.encoder.positional_embedding = full[: frames // 2].clone()
    try:
        mel = random_mel(2, seed=7)[:, :, :frames]
        ours = model.embed_audio(mel)
        assert ours.shape == (2, frames // 2, model.dims.n_audio_state)
        torch.testing.assert_close(ours, ref.embed_audio(mel), atol=ATOL, rtol=0)
    finally:
        ref.encoder.positional_embedding = full


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_encoder_attention_matches_fused_attention(dtype):
    """Encoder self-attention in bf16/fp16 on the CPU runs in query chunks (the last one short here); it computes the
    same attention as the fp32 fused kernel, to the half-precision dtype's rounding."""
    g = torch.Generator().manual_seed(3)
    t = 3 * ATTENTION_CHUNK + 44
    q, k, v = (torch.randn(2, 3, t, 32, generator=g) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ours = attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert ours.shape == exact.shape and ours.dtype == dtype
    assert torch.equal(ours, chunked_attention(q.to(dtype), k.to(dtype), v.to(dtype)))  # the path taken
    torch.testing.assert_close(ours.float(), exact, atol=2e-2, rtol=2e-2)
    fused = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    assert (ours.float() - exact).abs().mean() <= 2 * (fused - exact).abs().mean()  # no worse than the fused kernel


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encoder_batch_in_chunks_gives_the_whole_batchs_bits(random_setup, monkeypatch, dtype):
    """On the CPU ``embed_audio`` encodes a batch a few windows at a time (ENCODER_CHUNK_BYTES of MLP activations):
    the same bits as one pass over the whole batch, the last chunk short included."""
    from whisper_batch.model import whisper as whisper_module

    base, _ = random_setup
    model = Whisper(base.dims).to(dtype)
    model.load_state_dict(base.state_dict())
    model.pack_cpu_weights()  # as the product runs it
    mel = torch.cat([random_mel(1, seed=s) for s in range(5)]).to(dtype)
    whole = model.encoder(mel)
    per_window = (mel.shape[-1] // 2) * 4 * model.dims.n_audio_state * mel.element_size()
    monkeypatch.setattr(whisper_module, "ENCODER_CHUNK_BYTES", 2 * per_window)  # chunks of 2, 2 and 1 windows
    calls = []
    model.encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    assert torch.equal(model.embed_audio(mel), whole)
    assert calls == [2, 2, 1]


@torch.no_grad()
def test_bf16_encoder_stays_close_to_fp32(random_setup):
    """The whole encoder in bf16 (chunked attention) against fp32, on the random model."""
    model, _ = random_setup
    mel = random_mel(1, seed=9)
    exact = model.embed_audio(mel)
    half = Whisper(model.dims).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    ours = half.embed_audio(mel.to(torch.bfloat16)).float()
    assert (ours - exact).abs().mean() < 0.02 * exact.abs().mean()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_cpu_weights_give_the_same_logits(random_setup, dtype):
    """oneDNN-packed linear weights and vocabulary projection: the same encoder output and decoding-step logits as
    the plain weights (bit for bit in bf16), and the same state dict."""
    model, tokenizer = random_setup
    plain = Whisper(model.dims).to(dtype)
    plain.load_state_dict(model.state_dict())
    packed = Whisper(model.dims).to(dtype)
    packed.load_state_dict(model.state_dict())
    if not packed.pack_cpu_weights():
        pytest.skip("this torch or CPU cannot pack linear weights for oneDNN")
    assert packed.decoder.packed_projection is not None and packed.encoder.blocks[0].mlp[0].packed is not None
    assert packed.state_dict().keys() == plain.state_dict().keys()
    mel = random_mel(2, seed=11).to(dtype)
    features = [m.embed_audio(mel) for m in (plain, packed)]
    tokens = torch.tensor([[tokenizer.sot, *tokenizer.encode(" packed weights")]] * 2)
    steps = []
    for m, f in zip((plain, packed), features):
        cache = m.new_cache(f)
        steps.append(torch.cat([m.decode_step(tokens[:, :-1], cache)[:, -1:], m.decode_step(tokens[:, -1:], cache)], 1))
    if dtype == torch.bfloat16:
        assert torch.equal(features[0], features[1]) and torch.equal(steps[0], steps[1])
    else:
        torch.testing.assert_close(features[1], features[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(steps[1], steps[0], atol=ATOL, rtol=0)
    assert not torch.equal(steps[0][:, 0], steps[0][:, 1])  # two different positions: the comparison means something


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transposed_self_attention_keys_give_the_same_logits(random_model, features, dtype):
    """On the CPU in bf16/fp16 the cache stores the self-attention keys transposed (model/kv_cache.py): decoding
    steps, and steps after keep_audios, give the logits of a plain (..., max_len, d_head) buffer bit for bit."""
    model = Whisper(random_model.dims).to(dtype)
    model.load_state_dict(random_model.state_dict())
    feats = features.to(dtype)  # encoder output
    tokens = random_tokens(3, 12, seed=5)
    caches = [model.new_cache(feats, max_len=12) for _ in range(2)]
    transposed, plain = caches
    assert transposed.self_k.stride()[-2:] == (1, 12) and transposed.self_k.shape == plain.self_k.shape
    plain.self_k = torch.zeros(plain.self_k.shape, dtype=dtype)  # a contiguous (..., max_len, d_head) buffer
    assert plain.self_k.stride()[-1] == 1
    logits = [[], []]
    for cache, out in zip(caches, logits):
        out.append(model.decode_step(tokens[:, :4], cache))
        out += [model.decode_step(tokens[:, i : i + 1], cache) for i in range(4, 8)]
        cache.keep_audios(torch.tensor([2, 0]))
        out += [model.decode_step(tokens[[2, 0], i : i + 1], cache) for i in range(8, 11)]
    assert transposed.self_k.stride()[-2:] == (1, 12)  # keep_audios keeps the layout
    for a, b in zip(*logits):
        assert torch.equal(a, b)
    assert not torch.equal(logits[0][-1][0], logits[0][-1][1])  # different rows: the comparison means something
    fp32 = KVCache.allocate(n_layer=1, n_rows=2, n_head=2, d_head=4, max_len=6)  # fp32 keeps the plain layout
    assert fp32.self_k.is_contiguous()


@torch.no_grad()
def test_packed_layer_falls_back_when_its_dtype_changes(random_setup):
    model, _ = random_setup
    packed = Whisper(model.dims).to(torch.bfloat16)
    packed.load_state_dict(model.state_dict())
    if not packed.pack_cpu_weights():
        pytest.skip("this torch or CPU cannot pack linear weights for oneDNN")
    layer = packed.encoder.blocks[0].attn.query
    x = torch.randn(3, model.dims.n_audio_state)
    layer.float()  # the packed copy is bf16: an fp32 layer must use its own weight
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


# --------------------------------------------------------------------------- on a CUDA device


@torch.no_grad()
@pytest.mark.gpu
@needs_cuda
def test_cuda_encoder_and_logits_match_the_cpu(on_device, random_model, tiny_en_tokenizer):
    """fp32 on the device gives the CPU's numbers up to the kernels' rounding (no TF32); fp16, as the pipeline runs
    on a GPU, stays as close as bf16 does on the CPU."""
    model, _ = on_device("cuda")
    mel = random_mel(2, seed=5)
    tokens = torch.tensor([[tiny_en_tokenizer.sot, *tiny_en_tokenizer.encode(" hello world")]] * 2)
    exact = random_model.embed_audio(mel)
    exact_logits = random_model.logits(tokens, exact)
    audio = model.embed_audio(mel.cuda())
    torch.testing.assert_close(audio.cpu(), exact, atol=1e-3, rtol=0)
    torch.testing.assert_close(model.logits(tokens.cuda(), audio).cpu(), exact_logits, atol=1e-3, rtol=0)
    half = copy.deepcopy(model).half()
    ours = half.embed_audio(mel.cuda().half()).float().cpu()
    assert (ours - exact).abs().mean() < 0.02 * exact.abs().mean()
    logits = half.logits(tokens.cuda(), half.embed_audio(mel.cuda().half())).cpu()
    assert logits.dtype == torch.float32
    assert (logits - exact_logits).abs().mean() < 0.02 * exact_logits.abs().mean()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(1, 128, 3000), (1, 80, 2999), (1, 80, 3002), (1, 80, 0), (80, 3000)])
def test_wrong_mel_shape_is_a_clear_error(random_model, tiny_en_tokenizer, shape):
    mel = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"80 mel bins, 3000 frames"):
        random_model.embed_audio(mel)


def test_transcribe_rejects_wrong_mel_bins(random_model, tiny_en_tokenizer):
    with pytest.raises(ValueError, match=r"expected \(windows, 80, 3000\)"):
        transcribe_windows(random_model, tiny_en_tokenizer, torch.zeros(2, 128, 3000))


def test_layer_norm_keeps_its_fp32_parameters_only_while_they_are_unchanged():
    from whisper_batch.model.whisper import LayerNorm

    ln = LayerNorm(8).to(torch.bfloat16)
    x = torch.randn(2, 8).to(torch.bfloat16)
    def expected():
        return torch.nn.functional.layer_norm(x.float(), (8,), ln.weight.float(), ln.bias.float()).to(torch.bfloat16)
    assert torch.equal(ln(x), expected())
    with torch.no_grad():
        ln.weight.copy_(torch.arange(8.0))  # in place, as load_state_dict does
    assert torch.equal(ln(x), expected())
    ln.load_state_dict({"weight": torch.full((8,), 2.0), "bias": torch.ones(8)})
    assert torch.equal(ln(x), expected())
    ln.float()  # a new dtype: new tensors
    assert torch.equal(ln(x.float()), torch.nn.functional.layer_norm(x.float(), (8,), ln.weight, ln.bias))
