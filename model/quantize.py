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

Which int8 product runs depends on the CPU (:func:`int8_kernel`). ``torch._int_mm`` is fast only with VNNI; on an
AVX2 core without it, it is a slow loop (30-60x slower than fp32), while FBGEMM's dynamic int8 linear runs at 1.6x fp32
on the encoder's matmuls and 4x on the vocabulary projection. There each layer divides its input rows by their
absolute maxima before handing them to the dynamic linear (which then quantises them all with one scale, to 7 bits),
and multiplies its output rows back: scales per token, at half the resolution.

The projection onto the vocabulary (the tied token embedding, the largest matmul of every decoding step) is int8 as
well by default (``projection="int8"``); ``projection="float"`` keeps it in fp32 through oneDNN's packed weight.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .fused import QMAX, fused_quantize_rows, fused_rescale, quantize_rows, rescale, warm_up
from .torch_compat import (
    dynamic_int8_linear,
    dynamic_int8_works,
    int_mm,
    int_mm_works,
    pack_linear_weight,
    packed_linear,
    prepack_dynamic_int8,
    vnni,
)
from .whisper import Linear, MultiHeadAttention, Whisper

logger = logging.getLogger(__name__)

__all__ = ["KERNELS", "QMAX", "FloatProjection", "Int8Linear", "int8_kernel", "quantize_int8", "quantize_rows"]


KERNELS = ("int_mm", "dynamic", "float")


def int8_kernel() -> str:
    """The int8 product this machine runs fastest: ``"int_mm"`` (``torch._int_mm``) on a CPU with VNNI;
    ``"dynamic"`` (torch's dynamic int8 linear, FBGEMM on x86) without VNNI, where ``torch._int_mm`` is a slow loop;
    else whichever runs, ``"float"`` (the int8 values multiplied in fp32) last."""
    if int_mm_works() and vnni():
        return "int_mm"
    if dynamic_int8_works():
        return "dynamic"
    return "int_mm" if int_mm_works() else "float"


# The dynamic kernel's grid for an MLP's second layer, whose input is a GELU's output (never below -0.17): [-0.25, 1]
# keeps 7 bits for the positive side where [-1, 1] would halve them (which lost accuracy on long-10min)
GELU_FLOOR = -0.25


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W int8 per output channel, x int8 per row, int32 accumulation, fp32 out.

    ``weight_t`` is W^T (in, out), contiguous: the layout ``torch._int_mm`` reads fastest. Layers that read the same
    input (an attention's query, key and value) share ``shared``, a one-entry memo, so the input is quantised once.

    ``kernel`` (:data:`KERNELS`, default :func:`int8_kernel`): ``"int_mm"`` and ``"float"`` quantise each row to 8 bits
    (symmetric) and multiply the integers (``"float"`` in fp32: exact while a row's sum stays below 2^24, K <= 1040).
    ``"dynamic"`` scales each row into ``[floor, 1]`` (by its maximum, or by its minimum over ``-floor`` where that
    is larger; ``floor=-1``: by its absolute maximum), then hands the rows to torch's dynamic int8 linear, which
    quantises the whole tensor on one 7-bit grid, and multiplies each output row back: per-token scales still, so a
    loud token does not coarsen the other rows. One extra row of ``1`` and ``floor`` pins that grid to
    ``[floor, 1]``, so a row's result is the same whatever rows share its call.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: str | None = None, shared: list | None = None,
                 fused: bool = False, floor: float = -1.0):
        super().__init__()
        kernel = kernel or int8_kernel()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel must be one of {KERNELS}, not {kernel!r}")
        w = weight.detach().float()
        q, scale = quantize_rows(w)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        # the dynamic kernel reads only its prepacked copy
        self.register_buffer("weight_t", None if kernel == "dynamic" else q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.kernel = kernel
        self.dynamic = prepack_dynamic_int8(q, scale) if kernel == "dynamic" else None
        self.shared = shared
        self.fused = fused
        self.floor = floor
        # the dynamic kernel's extra row: the call's minimum and maximum, so its grid is [floor, 1] whatever the rows
        self.pin = None
        if kernel == "dynamic":
            self.pin = torch.zeros(1, self.in_features)
            self.pin[0, 0], self.pin[0, -1] = 1.0, floor

    def _quantized_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        memo = self.shared
        if memo is not None and memo[0] is x:
            return memo[1], memo[2]
        rows = x.reshape(-1, x.shape[-1])
        if self.kernel == "dynamic":  # few ops: at a decoding step's 16 rows each costs about a tenth of the product
            if self.floor == -1.0:
                scale = rows.abs().amax(dim=-1, keepdim=True)
            else:
                scale = torch.maximum(rows.amax(dim=-1, keepdim=True), rows.amin(dim=-1, keepdim=True) / self.floor)
            scale = scale.float().clamp_min_(1e-12)
            q = torch.cat([rows / scale, self.pin])
        else:
            q, scale = (fused_quantize_rows if self.fused else quantize_rows)(rows)
        if memo is not None:
            memo[:] = [x, q, scale]
        return q, scale

    def forward(self, x: Tensor) -> Tensor:
        q, scale = self._quantized_input(x)
        if self.kernel == "dynamic":
            y = dynamic_int8_linear(q, self.dynamic)[:-1] * scale
            if self.bias is not None:
                y += self.bias
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self.kernel == "int_mm":
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


def quantize_int8(model: Whisper, projection: str = "int8", fused: bool = False, decoder: bool = True) -> Whisper:
    """Quantise ``model`` (fp32 or bf16, CPU) in place and return it.

    Args:
        projection: ``"int8"`` (the vocabulary projection quantised like the other layers) or ``"float"`` (kept in
            the model's dtype, packed for oneDNN).
        fused: the quantisation and rescale around each int8 product compiled into one loop each (compiled here,
            or loaded from inductor's cache; eager where that fails).
        decoder: False quantises the encoder's layers only: the decoder and its projection keep the model's dtype
            (``model.quantize: int8-encoder``).
    """
    if model.dtype not in (torch.float32, torch.bfloat16) or model.device.type != "cpu":
        raise ValueError(f"int8 quantisation is for fp32 or bf16 models on the CPU, not {model.dtype} on "
                         f"{model.device}")
    if projection not in ("int8", "float"):
        raise ValueError(f"projection must be 'int8' or 'float', not {projection!r}")
    kernel = int8_kernel()
    if kernel == "float":
        logger.warning("neither torch._int_mm nor torch's dynamic int8 linear runs here: int8 layers multiply their "
                       "int8 values in fp32 (same numbers up to rounding, not faster)")
    for module in list((model if decoder else model.encoder).modules()):
        # an attention's query, key and value read the same input (cross-attention's key/value: the encoder output)
        shared = [None, None, None] if isinstance(module, MultiHeadAttention) else None
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                memo = shared if name in ("query", "key", "value") else None
                after_gelu = isinstance(module, nn.Sequential) and isinstance(module[int(name) - 1], nn.GELU)
                floor = GELU_FLOOR if after_gelu else -1.0
                setattr(module, name, Int8Linear(child.weight, child.bias, kernel, memo, fused, floor))
    if decoder:  # else the projection stays the tied embedding (packed by pack_cpu_weights)
        emb = model.decoder.token_embedding.weight
        if projection == "int8":
            model.decoder.out_proj = Int8Linear(emb, None, kernel, fused=fused)
        elif model.dtype == torch.float32:
            model.decoder.out_proj = FloatProjection(emb)
        # else a bf16 model keeps its own projection (the tied embedding, packed by pack_cpu_weights)
        model.decoder.packed_projection = None
    if fused and kernel != "dynamic":  # the dynamic linear quantises inside torch: nothing to compile
        seconds = warm_up(model.dtype)
        if seconds:
            logger.info("int8 layers: quantisation and rescale compiled in %.1f s (inductor's cache: later loads "
                        "are quicker)", seconds)
    return model
