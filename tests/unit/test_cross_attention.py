"""The decoder's cross-attention with its key and value layers folded into the query side
(``MultiHeadAttention.attend_cross_folded``): what the kv-cache holds on the CPU in bf16/fp16, the same attention as
the reference's form (exactly in fp32, to the dtype's rounding in bf16), for beams/best-of groups and compaction.
"""

from __future__ import annotations

import pytest
import torch

from model.whisper import Whisper
from tests.unit.test_model import random_mel, random_tokens

ATOL = 1e-4


def _copy(model: Whisper, dtype: torch.dtype) -> Whisper:
    m = Whisper(model.dims).to(dtype)
    m.load_state_dict(model.state_dict())
    return m.eval()


def _unfolded_cache(model: Whisper, features: torch.Tensor, group: int, max_len: int = 32):
    """A cache holding every layer's cross keys and values (the reference's form), whatever the dtype."""
    cache = model.new_cache(features, group, max_len=max_len)
    d, n = model.dims, features.shape[0]
    shape = (d.n_text_layer, n, d.n_text_head, features.shape[1], d.n_text_state // d.n_text_head)
    cache.cross_x, cache.cross_k, cache.cross_v = None, features.new_empty(shape), features.new_empty(shape)
    for layer, block in enumerate(model.decoder.blocks):
        k, v = block.cross_attn.cross_kv(features)
        cache.cross_k[layer].copy_(k)
        cache.cross_v[layer].copy_(v)
    return cache


@torch.no_grad()
@pytest.mark.parametrize("group", [1, 3])
def test_folded_cross_attention_is_the_same_attention_in_fp32(random_model, group):
    """The fold is an identity of the math: in fp32 it equals the reference's form to float rounding, with T > 1 new
    tokens and several rows per audio (rows audio-major)."""
    attn = random_model.decoder.blocks[1].cross_attn
    g = torch.Generator().manual_seed(5)
    xa = torch.randn(2, 40, random_model.dims.n_text_state, generator=g)
    x = torch.randn(2 * group, 3, random_model.dims.n_text_state, generator=g)
    k, v = attn.cross_kv(xa)
    expected = attn.attend_cross(x, k, v, group)
    torch.testing.assert_close(attn.attend_cross_folded(x, xa, group), expected, atol=ATOL, rtol=0)
    # a row decodes its own audio: rows of the second audio see nothing of the first
    only_second = attn.attend_cross_folded(x[group:], xa[1:], group)
    torch.testing.assert_close(only_second, expected[group:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_fp32_cache_keeps_the_reference_form_and_bf16_holds_the_encoder_output(random_model):
    features = random_model.embed_audio(random_mel(2, seed=3))
    exact = random_model.new_cache(features, group=2)
    assert exact.cross_x is None and exact.cross_k.shape[:2] == (random_model.dims.n_text_layer, 2)
    half = _copy(random_model, torch.bfloat16)
    folded = half.new_cache(features.to(torch.bfloat16), group=2)
    assert folded.cross_k is None and folded.cross_v is None
    assert folded.cross_x.shape == features.shape and folded.cross_x.dtype == torch.bfloat16


@torch.no_grad()
@pytest.mark.parametrize("group", [1, 3])
def test_bf16_decoding_steps_with_the_fold_match_the_reference_form(random_model, group):
    """Cached decoding in bf16 (prefix, then token by token): logits as close to fp32 as the unfolded bf16 form's."""
    half = _copy(random_model, torch.bfloat16)
    features = random_model.embed_audio(random_mel(2, seed=4))
    tokens = random_tokens(2 * group, 7, seed=8)
    exact = random_model.logits(tokens, features.repeat_interleave(group, dim=0))
    got = {}
    for name in ("folded", "unfolded"):
        f = features.to(torch.bfloat16)
        cache = half.new_cache(f, group, max_len=16) if name == "folded" else _unfolded_cache(half, f, group, 16)
        assert (cache.cross_x is not None) == (name == "folded")
        steps = [half.decode_step(tokens[:, :4], cache)]
        steps += [half.decode_step(tokens[:, t : t + 1], cache) for t in range(4, 7)]
        got[name] = torch.cat(steps, dim=1).float()
    err = {name: (logits - exact).abs().mean().item() for name, logits in got.items()}
    assert err["folded"] <= 1.5 * err["unfolded"], err
    assert err["folded"] < 0.05 * exact.abs().mean().item(), err  # bf16-close, not merely as bad as the other form


@torch.no_grad()
def test_keep_audios_keeps_the_folded_encoder_output_of_the_kept_audios(random_model):
    half = _copy(random_model, torch.bfloat16)
    features = random_model.embed_audio(random_mel(3, seed=6)).to(torch.bfloat16)
    tokens = random_tokens(6, 6, seed=7)  # 3 audios x 2 rows
    cache = half.new_cache(features, group=2, max_len=8)
    half.decode_step(tokens[:, :5], cache)
    cache.keep_audios(torch.tensor([2, 0]))
    assert torch.equal(cache.cross_x, features[[2, 0]])
    rows = torch.tensor([4, 5, 0, 1])
    got = half.decode_step(tokens[rows, 5:6], cache)[:, -1]
    fresh = half.new_cache(features[[2, 0]], group=2, max_len=8)
    expected = half.decode_step(tokens[rows], fresh)[:, -1]
    torch.testing.assert_close(got.float(), expected.float(), atol=0.15, rtol=0)
