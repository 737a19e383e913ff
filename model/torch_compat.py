"""Every private torch API the model uses, in one module, each behind a function that falls back to public torch.

Each is kept because it pays in a steady-state run (docs/performance.md, "CPU kernels"), and each is checked against
public torch on the installed version by ``tests/unit/test_torch_compat.py`` (seen passing on torch 2.13.0 and
2.14.1). Where one is missing or misbehaves (another torch, a build without oneDNN, a CPU without the kernels) the
callers take the public path: slower, the same results (int8 excepted: see :func:`int_mm_works`).

- oneDNN's packed linear weights (``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``): what
  torch.compile's CPU freezing does to linear layers, without torch.compile. Fallback: ``F.linear``.
- ``torch._int_mm`` (int8 x int8 -> int32): the int8 layers of ``model.quantize=int8``. Fallback: the int8 values
  multiplied in fp32.
- ``torch.cpu._is_vnni_supported``: picks the int8 product. Fallback: assume VNNI (``torch._int_mm``).
- ``torch.ops.quantized.linear_dynamic`` (public, but torch 2.13 deprecates quantized tensors for removal): the int8
  product on a CPU without VNNI. Fallback: ``torch._int_mm``.
- ``Tensor._version`` (the counter torch bumps on every in-place change): lets a layer norm keep its fp32 parameters
  until they change. Fallback: converted on every call.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

PACKABLE = (torch.float32, torch.bfloat16)  # the dtypes oneDNN packs linear weights for


def pack_linear_weight(weight: Tensor) -> Tensor | None:
    """``weight`` (out, in) reordered once into oneDNN's blocked layout for :func:`packed_linear`, or None where this
    torch or CPU cannot (the caller then uses ``F.linear`` on the plain weight).

    torch's CPU ``linear`` hands oneDNN a plain weight and oneDNN reorders it on every call; for the few rows of a
    decoding step that reorder is most of the work (tiny.en's vocabulary projection, 4 rows: 5.5 ms plain, 2.2 ms
    packed — the same bits).
    """
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE or not packing_works(weight.dtype):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4)
    except RuntimeError:  # a shape oneDNN will not pack
        return None


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, the weight as :func:`pack_linear_weight` packed it: x (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_works(dtype: torch.dtype) -> bool:
    """Whether both packing ops exist here and give ``F.linear``'s result on a small ``dtype`` input (a torch whose
    ops changed their signature fails here, not in the middle of a decode)."""
    try:
        g = torch.Generator().manual_seed(0)
        w, x = (torch.randn(shape, generator=g).to(dtype) for shape in ((8, 16), (3, 16)))
        y = packed_linear(x, torch.ops.mkldnn._reorder_linear_weight(w, 4))
        return y.shape == (3, 8) and torch.allclose(y.float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
    except (AttributeError, RuntimeError, TypeError):  # no mkldnn ops, or none for this CPU and dtype
        return False


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact (as long as no sum leaves int32)."""
    return torch._int_mm(a, b)


def int_mm_works() -> bool:
    """Whether :func:`int_mm` runs on this machine's CPU and gives the integer product (``torch._int_mm`` exists
    since torch 2.2). The fallback, the int8 values multiplied in fp32, is exact only while a row's sum stays below
    2^24 (K * 127^2: K <= 1040); above, float rounding changes a few logits' last bits."""
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (4, 32), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (32, 8), generator=g, dtype=torch.int8)
        return bool(torch.equal(int_mm(a, b), (a.long() @ b.long()).int()))
    except (AttributeError, RuntimeError):
        return False


def vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI), which ``torch._int_mm`` needs to be fast: without it
    torch's integer product is a slow loop (2026-12-07, an AVX2 core: 1000 x 384 x 1536 in 386-813 ms against 13 ms
    for fp32). ``torch.cpu._is_vnni_supported`` is private; where it is missing, True (the int8 path as before)."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return True


def prepack_dynamic_int8(q: Tensor, scale: Tensor) -> object:
    """int8 weights ``q`` (out, in) with one scale per output channel, packed for :func:`dynamic_int8_linear`
    (FBGEMM's or oneDNN's packed int8 weight: ``torch.ops.quantized.linear_prepack``, public)."""
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors (its issue 184982); see the fallback
        warnings.simplefilter("ignore", UserWarning)
        w = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(), zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(w, None)


def dynamic_int8_linear(x: Tensor, packed: object) -> Tensor:
    """fp32 (M, in) -> fp32 (M, out) through torch's dynamic int8 linear: the input quantised per tensor to 7 bits
    (``reduce_range``: no int16 overflow in the u8 x s8 pairs of AVX2's int8 product), int32 accumulation."""
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def dynamic_int8_works() -> bool:
    """Whether :func:`dynamic_int8_linear` runs here and gives the float product within int8's error."""
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(16, 32, generator=g), torch.randn(3, 32, generator=g)
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        y, ref = dynamic_int8_linear(x, prepack_dynamic_int8(q, scale)), F.linear(x, w)
        return y.shape == (3, 16) and bool(((y - ref).norm() / ref.norm()) < 0.05)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False


def version_counter(t: Tensor) -> object:
    """A value that changes whenever ``t`` is changed in place (torch's ``Tensor._version``); where this torch has
    none, a new object on every call, so that a cache keyed on it is never reused (correct, only slower)."""
    try:
        return t._version
    except AttributeError:
        return object()
