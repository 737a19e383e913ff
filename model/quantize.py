"""int8 inference on the CPU as CTranslate2 does it.

Every linear layer keeps its weight as int8 with one scale per output channel (row), and quantises its input per
token (one scale per row of activations, the row's absolute maximum over 127) on every call; the int8 x int8 product
accumulates in int32 (``torch._int_mm``, oneDNN/fbgemm underneath) and is scaled back to fp32 with the two scales,
where the bias is added. Everything else runs in the model's dtype (fp32, or bf16 on a CPU that has it): the residual
stream, attention (q k^T and the softmax), the convolutions and the embeddings; layer norms in fp32 as always.

With ``fused=True`` (``model.compile``) the input quantisation and the rescale are each one compiled loop
(:mod:`whisper_batch.model.fused`, the same bits) instead of six and four eager passes over the activations, which
cost more than the int8 product saves on tiny.en's small matmuls.

Per-token activation scales are what ``torch.ao`` dynamic quantisation does not do (it scales the whole activation
tensor with one number, so one loud token coarsens every other row of the batch; that cost WER on the dev set).

The projection onto the vocabulary (the tied token embedding, the largest matmul of every decoding step) is int8 as
well by default (``projection="int8"``); ``projection="float"`` keeps it in fp32 through oneDNN's packed weight.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .fused import QMAX, fused_quantize_rows, fused_rescale, quantize_rows, rescale, warm_up
from .torch_compat import int_mm, int_mm_works, pack_linear_weight, packed_linear
from .whisper import Linear, MultiHeadAttention, Whisper

logger = logging.getLogger(__name__)

__all__ = ["QMAX", "FloatProjection", "Int8Linear", "quantize_int8", "quantize_rows"]


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W int8 per output channel, x int8 per row, int32 accumulation, fp32 out.

    ``weight_t`` is W^T (in, out), contiguous: the layout ``torch._int_mm`` reads fastest. Layers that read the same
    input (an attention's query, key and value) share ``shared``, a one-entry memo, so the input is quantised once.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, use_int_mm: bool = True, shared: list | None = None,
                 fused: bool = False):
        super().__init__()
        w = weight.detach().float()
        q, scale = quantize_rows(w)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.use_int_mm = use_int_mm
        self.shared = shared
        self.fused = fused

    def _quantized_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        memo = self.shared
        if memo is not None and memo[0] is x:
            return memo[1], memo[2]
        q, scale = (fused_quantize_rows if self.fused else quantize_rows)(x.reshape(-1, x.shape[-1]))
        if memo is not None:
            memo[:] = [x, q, scale]
        return q, scale

    def forward(self, x: Tensor) -> Tensor:
        q, scale = self._quantized_input(x)
        if self.use_int_mm:
            acc = int_mm(q, self.weight_t)
        else:  # exact while a row's sum stays below 2^24 (K * 127^2): K <= 1040; above, off by float rounding
            acc = q.float() @ self.weight_t.float()
        y = (fused_rescale if self.fused else rescale)(acc, scale, self.weight_scale, self.bias, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

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


def quantize_int8(model: Whisper, projection: str = "int8", fused: bool = False) -> Whisper:
    """Quantise ``model`` (fp32 or bf16, CPU) in place and return it.

    Args:
        projection: ``"int8"`` (the vocabulary projection quantised like the other layers) or ``"float"`` (kept in
            the model's dtype, packed for oneDNN).
        fused: the quantisation and rescale around each int8 product compiled into one loop each (compiled here,
            or loaded from inductor's cache; eager where that fails).
    """
    if model.dtype not in (torch.float32, torch.bfloat16) or model.device.type != "cpu":
        raise ValueError(f"int8 quantisation is for fp32 or bf16 models on the CPU, not {model.dtype} on "
                         f"{model.device}")
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
                setattr(module, name, Int8Linear(child.weight, child.bias, use_int_mm, memo, fused))
    emb = model.decoder.token_embedding.weight
    if projection == "int8":
        model.decoder.out_proj = Int8Linear(emb, None, use_int_mm, fused=fused)
    elif model.dtype == torch.float32:
        model.decoder.out_proj = FloatProjection(emb)
    # else a bf16 model keeps its own projection (the tied embedding, packed by pack_cpu_weights)
    model.decoder.packed_projection = None
    if fused:
        seconds = warm_up(model.dtype)
        if seconds:
            logger.info("int8 layers: quantisation and rescale compiled in %.1f s (inductor's cache: later loads "
                        "are quicker)", seconds)
    return model
