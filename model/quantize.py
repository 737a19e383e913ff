"""int8 inference on the CPU as CTranslate2 does it.

Every linear layer keeps its weight as int8 with one scale per output channel (row), and quantises its input per
token (one scale per row of activations, the row's absolute maximum over 127) on every call; the int8 x int8 product
accumulates in int32 (``torch._int_mm``, oneDNN/fbgemm underneath) and is scaled back to fp32 with the two scales,
where the bias is added. Everything else stays fp32: the residual stream, layer norms, attention (q k^T and the
softmax), the convolutions and the embeddings.

Per-token activation scales are what ``torch.ao`` dynamic quantisation does not do (it scales the whole activation
tensor with one number, so one loud token coarsens every other row of the batch; that cost WER on the dev set).

The projection onto the vocabulary (the tied token embedding, the largest matmul of every decoding step) is int8 as
well by default (``projection="int8"``); ``projection="float"`` keeps it in fp32 through oneDNN's packed weight.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .torch_compat import int_mm, int_mm_works, pack_linear_weight, packed_linear
from .whisper import Linear, MultiHeadAttention, Whisper

logger = logging.getLogger(__name__)

QMAX = 127.0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: x (M, K) float -> (int8 (M, K), scale (M,) fp32) with x ~= q * scale[:, None]."""
    scale = x.abs().amax(dim=-1).float().clamp_min(1e-12) / QMAX
    q = torch.round(x.float() / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W int8 per output channel, x int8 per row, int32 accumulation, fp32 out.

    ``weight_t`` is W^T (in, out), contiguous: the layout ``torch._int_mm`` reads fastest. Layers that read the same
    input (an attention's query, key and value) share ``shared``, a one-entry memo, so the input is quantised once.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, use_int_mm: bool = True, shared: list | None = None):
        super().__init__()
        w = weight.detach().float()
        q, scale = quantize_rows(w)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.use_int_mm = use_int_mm
        self.shared = shared

    def _quantized_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        memo = self.shared
        if memo is not None and memo[0] is x:
            return memo[1], memo[2]
        q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        if memo is not None:
            memo[:] = [x, q, scale]
        return q, scale

    def forward(self, x: Tensor) -> Tensor:
        q, scale = self._quantized_input(x)
        if self.use_int_mm:
            acc = int_mm(q, self.weight_t).float()
        else:  # exact while a row's sum stays below 2^24 (K * 127^2): K <= 1040; above, off by float rounding
            acc = q.float() @ self.weight_t.float()
        # the order of these roundings is the one the yardstick measured (a different order flips a few greedy tokens)
        y = acc.mul_(scale[:, None]).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x per token"


class FloatProjection(nn.Module):
    """The vocabulary projection kept in fp32 (packed for oneDNN where it can be)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.packed = pack_linear_weight(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return packed_linear(x.float(), self.packed)
        return x.float() @ self.weight.T


def quantize_int8(model: Whisper, projection: str = "int8") -> Whisper:
    """Quantise ``model`` (fp32, CPU) in place and return it.

    Args:
        projection: ``"int8"`` (the vocabulary projection quantised like the other layers) or ``"float"`` (fp32).
    """
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise ValueError(f"int8 quantisation is for fp32 models on the CPU, not {model.dtype} on {model.device}")
    if projection not in ("int8", "float"):
        raise ValueError(f"projection must be 'int8' or 'float', not {projection!r}")
    use_int_mm = int_mm_works()
    if not use_int_mm:
        logger.warning("torch._int_mm does not run here: int8 layers multiply their int8 values in fp32 (same "
                       "numbers up to rounding, not faster)")
    for module in list(model.modules()):
        # an attention's query, key and value read the same input (cross-attention's key/value: the encoder output)
        shared = [None, None, None] if isinstance(module, MultiHeadAttention) else None
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                memo = shared if name in ("query", "key", "value") else None
                setattr(module, name, Int8Linear(child.weight, child.bias, use_int_mm, memo))
    emb = model.decoder.token_embedding.weight
    model.decoder.out_proj = (
        Int8Linear(emb, None, use_int_mm) if projection == "int8" else FloatProjection(emb)
    )
    model.decoder.packed_projection = None
    return model
