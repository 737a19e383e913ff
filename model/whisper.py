"""The Whisper network, following the reference design and parameter names, with an explicit kv-cache.

Parameter names match the official checkpoints (``encoder.blocks.0.attn.query.weight`` …), so an OpenAI
``model_state_dict`` loads with ``strict=True``. Attention runs through ``scaled_dot_product_attention``; the decoder
writes keys/values into a :class:`~whisper_batch.model.kv_cache.KVCache` instead of forward hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dims import ModelDimensions
from .kv_cache import KVCache
from .torch_compat import pack_linear_weight, packed_linear, version_counter


class LayerNorm(nn.LayerNorm):
    _float_key: tuple | None = None
    _float_params: tuple[Tensor | None, Tensor | None] = (None, None)

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 whatever the activations' (and weights') dtype, as the reference does
        return F.layer_norm(x.float(), self.normalized_shape, *self.float_params(), self.eps).type(x.dtype)

    def float_params(self) -> tuple[Tensor | None, Tensor | None]:
        """The weight and bias in fp32, converted once and kept until a parameter moves or changes (a decoding
        step has 13 layer norms: converting their parameters on every call cost about a tenth of a tiny.en step)."""
        params = (self.weight, self.bias)
        key = tuple((p.data_ptr(), p.dtype, version_counter(p)) if p is not None else None for p in params)
        if key != self._float_key:
            self._float_params = tuple(p.detach().float() if p is not None else None for p in params)
            self._float_key = key
        return self._float_params


class Linear(nn.Linear):
    # the weight laid out for oneDNN by pack_cpu_weights (CPU inference only; not in the state dict)
    packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.packed is not None and x.dtype == self.weight.dtype == self.packed.dtype and x.device.type == "cpu":
            return packed_linear(x, self.packed, bias)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv1d(nn.Conv1d):
    def forward(self, x: Tensor) -> Tensor:
        # the weights in the activations' dtype, as the reference does (torch's Conv1d.forward, padding_mode zeros)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv1d(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """Sinusoidal position encodings (length, channels): sin in the first half of the channels, cos in the second."""
    if channels % 2:
        raise ValueError(f"sinusoids need an even number of channels, got {channels}")
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, np.newaxis] * inv_timescales[np.newaxis, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, T, D) tensors.

    The fused kernel, except in bf16/fp16 on the CPU, where torch's kernel is slower than plain matmuls: a few query
    positions against many keys (every decoding step's cross-attention) take two matmuls with the softmax in fp32,
    and unmasked attention over many positions (the encoder) takes :func:`chunked_attention`.
    """
    if q.device.type == "cpu" and q.dtype != torch.float32 and not causal:
        if q.shape[2] <= 8:
            scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            return scores.softmax(dim=-1).to(v.dtype) @ v
        if mask is None and q.shape[2] >= ATTENTION_CHUNK:
            return chunked_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


# Bytes of MLP activations per encoder pass on the CPU (Whisper.embed_audio): 16 windows of 30 s in one pass took
# 4.5-4.8 s and faulted in about 400,000 pages; in passes of 2 windows (9 MB), 3.9-4.1 s and none (tiny.en, bf16).
ENCODER_CHUNK_BYTES = 10 << 20

ATTENTION_CHUNK = 128  # query rows per step of chunked_attention: their scores against 1500 keys stay in cache


def chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked attention as plain matmuls over chunks of queries, one batch item at a time — the encoder's
    self-attention in bf16/fp16 on the CPU, where torch's fused kernel runs at about half the speed of its matmuls.

    A step is one item's heads x ``ATTENTION_CHUNK`` queries against its keys: (H, 128, 1500) scores in bf16 stay in
    the core's L2 cache between the two matmuls and the softmax. Chunking across the whole batch at once makes B times
    larger score blocks that spill to memory (8 windows of tiny.en, one layer, one core: 215 ms batched chunks, 125 ms
    per item, the same bits). (B, H, T, D) in; the result is a (B, H, T, D) view of a (B, T, H, D) tensor, the
    layout ``MultiHeadAttention.merge`` wants."""
    b, h, t, d = q.shape
    # contiguous (B, H, T, D) once: a chunk of q, and k^T, then go to the matmul kernel without a copy per chunk
    q, k, v = (q * d**-0.5).contiguous(), k.contiguous(), v.contiguous()
    kt = k.transpose(-1, -2)
    out = q.new_empty(b, t, h, d)
    for item in range(b):
        qi, kti, vi, oi = q[item], kt[item], v[item], out[item]
        for i in range(0, t, ATTENTION_CHUNK):
            scores = qi[:, i : i + ATTENTION_CHUNK] @ kti  # (H, chunk, T)
            oi[i : i + ATTENTION_CHUNK] = (scores.softmax(dim=-1) @ vi).transpose(0, 1)
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, H, T, C/H)"""
        b, t, c = x.shape
        return x.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:
        """(B, H, T, D) -> (B, T, H*D)"""
        b, h, t, d = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, h * d))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Full self-attention (encoder, or the decoder without a cache). x: (B, T, C)."""
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        o = attention(q, k, v, mask, causal=causal and x.shape[1] > 1)
        return self.merge(o)

    def attend_cached(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """Decoder self-attention: write this step's K/V into the cache, attend to every position so far."""
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        k, v = cache.write_self(layer, k, v)
        t, end = q.shape[2], k.shape[2]
        mask = None
        if t > 1:  # several new tokens at once: new token i sees the cached prefix and new tokens <= i
            mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(end - t)
        if cache.pad is not None:  # left-padded prompts: a row's padding is seen by no position but its own
            keys = torch.arange(end, device=x.device)
            seen = (keys >= cache.pad[:, None, None]) | (keys == torch.arange(end - t, end, device=x.device)[:, None])
            mask = (seen if mask is None else seen & mask)[:, None]  # (rows, 1, t, end)
        o = attention(q, k, v, mask)
        return self.merge(o)

    def cross_kv(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output (n_audio, S, C) -> keys and values (n_audio, H, S, D), computed once per batch."""
        return self.heads(self.key(xa)), self.heads(self.value(xa))

    def attend_cross(self, x: Tensor, k: Tensor, v: Tensor, group: int, runs: list | None = None) -> Tensor:
        """Cross-attention of ``group`` rows per audio against that audio's keys, without repeating them.

        Cross-attention has no mask and each query is independent, so the group's queries can be stacked along the
        time axis of one attention call per audio: (n_audio*group, H, T, D) -> (n_audio, H, group*T, D).
        ``runs`` (``KVCache.cross_runs``): audios of several encoder lengths, each run of like-length audios attends
        to its own first positions only (a view of the padded keys: no copy, no mask).
        """
        q = self.heads(self.query(x))
        rows, h, t, d = q.shape
        if group > 1:
            q = q.view(rows // group, group, h, t, d).transpose(1, 2).reshape(rows // group, h, group * t, d)
        if runs is None:
            o = attention(q, k, v)
        else:
            o = torch.cat([attention(q[a:b], k[a:b, :, :n], v[a:b, :, :n]) for a, b, n in runs])
        if group > 1:
            o = o.view(rows // group, h, group, t, d).transpose(1, 2).reshape(rows, h, t, d)
        return self.merge(o)

    def attend_cross_weights(self, x: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention that also returns its pre-softmax scores, for the word-alignment pass only.

        Explicit ``softmax(q k^T)`` instead of the fused kernel, which does not expose the weights.
        x: (B, T, C); k, v: (B, H, S, D) -> output (B, T, C) and scores (B, H, T, S) in fp32.
        """
        q = self.heads(self.query(x))
        scale = q.shape[-1] ** -0.25  # on q and k separately, as the reference does, to keep fp16 in range
        qk = ((q * scale) @ (k * scale).transpose(-1, -2)).float()
        o = qk.softmax(dim=-1).to(q.dtype) @ v
        return self.merge(o), qk


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False, layer: int = 0):
        super().__init__()
        self.layer = layer  # index into the kv-cache
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        n_mlp = n_state * 4
        self.mlp = nn.Sequential(Linear(n_state, n_mlp), nn.GELU(), Linear(n_mlp, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor, xa: Tensor | None = None, causal: bool = False) -> Tensor:
        """Uncached pass: the encoder, or the decoder over a whole token sequence."""
        x = x + self.attn(self.attn_ln(x), causal=causal)
        if self.cross_attn is not None:
            k, v = self.cross_attn.cross_kv(xa)
            x = x + self.cross_attn.attend_cross(self.cross_attn_ln(x), k, v, x.shape[0] // xa.shape[0])
        return x + self.mlp(self.mlp_ln(x))

    def forward_with_weights(self, x: Tensor, xa: Tensor) -> tuple[Tensor, Tensor]:
        """Uncached decoder pass that also returns the cross-attention scores (B, H, T, S), fp32."""
        x = x + self.attn(self.attn_ln(x), causal=True)
        k, v = self.cross_attn.cross_kv(xa)
        o, qk = self.cross_attn.attend_cross_weights(self.cross_attn_ln(x), k, v)
        x = x + o
        return x + self.mlp(self.mlp_ln(x)), qk

    def forward_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        x = x + self.attn.attend_cached(self.attn_ln(x), cache, self.layer)
        k, v = cache.cross_k[self.layer], cache.cross_v[self.layer]
        x = x + self.cross_attn.attend_cross(self.cross_attn_ln(x), k, v, cache.group, cache.cross_runs)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.n_mels, self.n_ctx = n_mels, n_ctx
        self.conv1 = Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, n_mels, frames) log-mel -> (B, frames // 2, n_state).

        ``frames`` is ``2 * n_ctx`` (a 30 s window) as in training, or fewer (an even number): the window cut short,
        its padding trimmed, with the first ``frames // 2`` positional embeddings (as whisper.cpp's ``audio_ctx``).
        """
        if x.ndim != 3 or x.shape[1] != self.n_mels or not 0 < x.shape[2] <= 2 * self.n_ctx or x.shape[2] % 2:
            raise ValueError(
                f"mel of shape {tuple(x.shape)} does not fit this model: expected (batch, {self.n_mels}, "
                f"{2 * self.n_ctx}) — {self.n_mels} mel bins, {2 * self.n_ctx} frames per 30 s window (or an even "
                f"number of frames below that)"
            )
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1)  # (B, n_ctx, n_state)
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.n_ctx, self.n_head, self.n_state = n_ctx, n_head, n_state
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(n_state, n_head, cross_attention=True, layer=i) for i in range(n_layer)]
        )
        self.ln = LayerNorm(n_state)
        # optional separate output projection (an int8 copy of the tied embedding, see model/quantize.py)
        self.out_proj: nn.Module | None = None
        # the tied embedding packed for oneDNN by pack_cpu_weights, for the projection onto the vocabulary
        self.packed_projection: Tensor | None = None

    def embed(self, tokens: Tensor, offset: int, pad: Tensor | None = None) -> Tensor:
        """Token plus position embeddings; with ``pad`` (rows,), each row's positions count from its first token
        after that many padding tokens (a row's padding gets position 0: no position sees it but its own)."""
        if pad is None:
            return self.token_embedding(tokens) + self.positional_embedding[offset : offset + tokens.shape[-1]]
        positions = (torch.arange(offset, offset + tokens.shape[-1], device=tokens.device) - pad[:, None]).clamp(min=0)
        return self.token_embedding(tokens) + self.positional_embedding[positions]

    def project(self, x: Tensor) -> Tensor:
        x = self.ln(x)
        if self.out_proj is not None:
            return self.out_proj(x).float()
        packed = self.packed_projection
        if packed is not None and x.dtype == self.token_embedding.weight.dtype == packed.dtype:
            return packed_linear(x, packed).float()
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()

    def forward(self, tokens: Tensor, xa: Tensor, cache: KVCache | None = None) -> Tensor:
        """tokens (rows, T); xa (n_audio, n_audio_ctx, n_audio_state) -> logits (rows, T, n_vocab), fp32.

        Without a cache the whole sequence is processed. With one, ``tokens`` are only the new tokens: their
        positions start at ``cache.length``, and the cache advances by T.
        """
        if cache is None:
            x = self.embed(tokens, 0).to(xa.dtype)
            for block in self.blocks:
                x = block(x, xa, causal=True)
            return self.project(x)
        x = self.embed(tokens, cache.length, cache.pad).to(cache.self_k.dtype)
        for block in self.blocks:
            x = block.forward_cached(x, cache)
        cache.length += tokens.shape[-1]
        return self.project(x)

    def forward_with_cross_weights(self, tokens: Tensor, xa: Tensor, heads: Tensor, project: bool = True
                                   ) -> tuple[Tensor, Tensor]:
        """Uncached pass over whole sequences, one row per audio, keeping the cross-attention of ``heads``.

        Args:
            tokens: (B, T); rows may be right-padded: causal self-attention keeps padding out of the real positions.
            xa: (B, n_audio_ctx, n_audio_state) encoder output.
            heads: (n_layer, n_head) bool mask of the heads to keep.

        Returns:
            logits (B, T, n_vocab) fp32 (with ``project=False``, the last block's output (B, T, n_text_state) in
            xa's dtype instead, for :meth:`project` to take the rows that are needed), and the kept heads'
            pre-softmax scores (B, n_kept, T, n_audio_ctx) fp32, in (layer, head) order.
        """
        x = self.embed(tokens, 0).to(xa.dtype)
        heads = heads.cpu()  # read per layer below: no device sync per layer
        kept = []
        for layer, block in enumerate(self.blocks):
            if heads[layer].any():  # only these layers pay for explicit attention weights
                x, qk = block.forward_with_weights(x, xa)
                kept.append(qk[:, heads[layer].to(qk.device)])
            else:
                x = block(x, xa, causal=True)
        weights = torch.cat(kept, dim=1) if kept else x.new_zeros(x.shape[0], 0, x.shape[1], xa.shape[1]).float()
        return (self.project(x) if project else x), weights


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )
        # by default the last half of the decoder layers time words (the reference's default)
        heads = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        heads[dims.n_text_layer // 2 :] = True
        self.register_buffer("alignment_heads", heads, persistent=False)

    def set_alignment_heads(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Set the heads from (layer, head) pairs, as a CTranslate2 ``config.json`` lists them (the reference's
        base85 dump decodes to pairs with :func:`whisper_batch.model.checkpoint.decode_alignment_heads`)."""
        mask = torch.zeros_like(self.alignment_heads)
        for layer, head in pairs:
            mask[layer, head] = True
        self.alignment_heads = mask

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual

    @property
    def num_languages(self) -> int:
        return self.dims.num_languages

    @property
    def device(self) -> torch.device:
        return self.decoder.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.positional_embedding.dtype

    def embed_audio(self, mel: Tensor) -> Tensor:
        """The encoder's output for a batch of mel windows (B, n_mels, frames) -> (B, frames // 2, n_audio_state).

        On the CPU, a few windows at a time (:data:`ENCODER_CHUNK_BYTES`), which gives the same bits: a whole batch's
        activations are large enough that glibc maps every one afresh and the kernel faults it in page by page, and
        each op's output falls out of the cache before the next op reads it."""
        per_window = (mel.shape[-1] // 2) * 4 * self.dims.n_audio_state * mel.element_size()  # its MLP activations
        step = max(1, ENCODER_CHUNK_BYTES // max(1, per_window))
        if mel.device.type != "cpu" or mel.dim() != 3 or step >= mel.shape[0]:  # (a wrong shape: the encoder's error)
            return self.encoder(mel)
        return torch.cat([self.encoder(chunk) for chunk in mel.split(step)])

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        return self.decoder(tokens, audio_features)

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        return self.decoder(tokens, self.encoder(mel))

    def new_cache(
        self, audio_features: Tensor, group: int = 1, max_len: int | None = None, lengths: list[int] | None = None
    ) -> KVCache:
        """Allocate a cache for ``group`` rows per audio and fill its cross-attention K/V from the encoder output.

        ``lengths``: per audio, its real encoder positions where passes of several lengths share the batch (the
        features zero-padded to the longest); best ordered so like lengths are neighbours (one attention call per
        run of them)."""
        d = self.dims
        cache = KVCache.allocate(
            n_layer=d.n_text_layer,
            n_rows=audio_features.shape[0] * group,
            n_head=d.n_text_head,
            d_head=d.n_text_state // d.n_text_head,
            max_len=max_len or d.n_text_ctx,
            group=group,
            device=audio_features.device,
            dtype=audio_features.dtype,
        )
        if lengths is not None and len(lengths) != audio_features.shape[0]:
            raise ValueError(f"{len(lengths)} lengths given for {audio_features.shape[0]} audios")
        cache.set_cross_lengths(lengths, audio_features.shape[1])
        self.prefill_cross(audio_features, cache)
        return cache

    def prefill_cross(self, audio_features: Tensor, cache: KVCache) -> None:
        """The cross K/V of every layer; with runs of several lengths only their real positions (the padding's are
        never read)."""
        d, n, positions = self.dims, audio_features.shape[0], audio_features.shape[1]
        shape = (d.n_text_layer, n, d.n_text_head, positions, d.n_text_state // d.n_text_head)
        cache.cross_k, cache.cross_v = audio_features.new_empty(shape), audio_features.new_empty(shape)
        for a, b, m in cache.cross_runs or [(0, n, positions)]:  # the runs set just now, or the whole batch
            for layer, block in enumerate(self.decoder.blocks):  # copy_ of the head-split views: 2x faster than stack
                k, v = block.cross_attn.cross_kv(audio_features[a:b, :m])
                cache.cross_k[layer, a:b, :, :m].copy_(k)
                cache.cross_v[layer, a:b, :, :m].copy_(v)

    def pack_cpu_weights(self) -> bool:
        """Pack every linear layer's weight, and the vocabulary projection, for oneDNN (CPU inference, fp32/bf16).

        Call it once the model has its final device and dtype: the packed copies do not follow ``.to()`` (a layer
        whose dtype no longer matches falls back to the plain weight). Returns whether the weights were packed; off
        the CPU, or on a torch or CPU that cannot pack (model/torch_compat.py), nothing changes. The packed copies
        take as much memory as the weights.
        """
        layers = [m for m in self.modules() if isinstance(m, Linear)]
        packed = [pack_linear_weight(m.weight) for m in layers]
        own_projection = self.decoder.out_proj is None  # else an int8 (or fp32) copy projects, see model/quantize.py
        projection = pack_linear_weight(self.decoder.token_embedding.weight) if own_projection else None
        if (own_projection and projection is None) or any(p is None for p in packed):
            return False
        for layer, p in zip(layers, packed):
            layer.packed = p
        self.decoder.packed_projection = projection
        return True

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """New tokens (rows, T) -> logits (rows, T, n_vocab); advances the cache."""
        return self.decoder(tokens, None, cache)

    def alignment_weights(self, tokens: Tensor, audio_features: Tensor, project: bool = True) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass for word timing: logits (B, T, n_vocab) fp32 (``project=False``: the last block's
        output (B, T, n_text_state) in the model's dtype, before ``decoder.project``) and the alignment heads'
        cross-attention scores (B, n_alignment_heads, T, n_audio_ctx) fp32. tokens (B, T), one row per audio."""
        return self.decoder.forward_with_cross_weights(tokens, audio_features, self.alignment_heads, project)
