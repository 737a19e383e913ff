"""Small operators fused by ``torch.compile``, each with its eager twin, which runs wherever compiling does not.

Eager PyTorch runs an int8 layer's input quantisation as six passes over the activations and its rescale as three or
four; inductor (torch.compile's CPU backend) turns each into one vectorised C++ loop, with the same arithmetic in the
same order: the compiled and eager results are the same bits (``tests/unit/test_fused.py``).

Compiling needs a C++ compiler and a writable cache folder (inductor's, ``TORCHINDUCTOR_CACHE_DIR``, by default under
the system's temporary folder: one per node, so a node compiles once and its other actors and later runs load the
compiled code; inductor writes its cache entries atomically, so actors sharing it is safe). Where compiling fails for
any reason (no compiler, a cache folder it cannot write, a torch without inductor) the eager twin runs from then on,
and one warning says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

QMAX = 127.0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: x (M, K) float -> (int8 (M, K), scale (M,) fp32) with x ~= q * scale[:, None]."""
    scale = x.abs().amax(dim=-1).float().clamp_min(1e-12) / QMAX
    q = torch.round(x.float() / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def rescale(acc: Tensor, scale: Tensor, weight_scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """An int8 product's int32 sums (M, N) back to ``dtype``: times the rows' and the channels' scales, plus the bias
    (in that order: the order the yardstick measured; another flips a few greedy tokens)."""
    y = acc.float() * scale[:, None] * weight_scale
    if bias is not None:
        y = y + bias
    return y.to(dtype)


class Fused:
    """``eager`` compiled on first use (shapes dynamic: one compiled kernel serves every batch); after any failure to
    compile or run the compiled code, ``eager`` from then on."""

    def __init__(self, eager: Callable[..., object]):
        self.eager = eager
        self.compiled: Callable[..., object] | None = None
        self.failed = False
        self.error = ""  # why compiling failed, where it did
        self.compile_s = 0.0  # seconds of the first call, which compiles (or loads the cached kernel)

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        # detached: a view's base is no longer part of the input, so views and fresh tensors share one compiled
        # kernel (torch.compile guards on a view's base and compiled a kernel per kind of view, up to its limit)
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        try:
            if self.compiled is None:
                t0 = time.perf_counter()
                self.compiled = torch.compile(self.eager, dynamic=True)
                out = self.compiled(*args)
                self.compile_s = time.perf_counter() - t0
                return out
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 — whatever breaks in the compiler, the eager twin gives the result
            self.failed = True
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the compiler's error
            self.error = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
            logger.warning("torch.compile of %s failed (%s); running it eagerly", self.eager.__name__, self.error)
            return self.eager(*args)


fused_quantize_rows = Fused(quantize_rows)
fused_rescale = Fused(rescale)


def warm_up(dtype: torch.dtype, width: int = 64) -> float:
    """Compiles (or loads from the cache) every kernel a model in ``dtype`` calls: quantisation, rescale with and
    without a bias, each for one row and for several (torch.compile specialises a size of 1), outside inference mode
    as the decoder runs, so that no model call pays for it and no later call recompiles; returns the seconds that took
    (0 where compiling failed)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in (1, 3):
            q, scale = fused_quantize_rows(torch.ones(rows, width, dtype=dtype))
            acc = torch.ones(rows, 5, dtype=torch.int32)
            fused_rescale(acc, scale, torch.ones(5), torch.zeros(5), dtype)
            fused_rescale(acc, scale, torch.ones(5), None, dtype)
    return 0.0 if fused_quantize_rows.failed or fused_rescale.failed else time.perf_counter() - t0
