"""Where and in what precision a model replica runs, and how much memory a batch may take."""

from __future__ import annotations

import ctypes

import torch

from .config import ModelConfig


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_device(m: ModelConfig) -> tuple[str, torch.dtype]:
    """``auto``: fp16 on a GPU; on a CPU bf16 where it is native (half the memory traffic of fp32 per decoding step,
    the same WER on the eval set), else fp32 — and fp32 for int8 quantisation, which starts from fp32 weights
    (with int8-encoder the decoder keeps bf16 where it is native)."""
    device = m.device if m.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if m.dtype != "auto":
        return device, getattr(torch, m.dtype)
    if device.startswith("cuda"):
        return device, torch.float16
    return device, torch.bfloat16 if quantize_mode(m, device) != "int8" and cpu_has_bf16() else torch.float32


def quantize_mode(m: ModelConfig, device: str) -> str:
    """``model.quantize`` resolved: ``auto`` is int8-encoder on a CPU without native bf16 (there the encoder's int8
    layers beat fp32, and int8 in the decoder adds no speed and loses words; on a bf16 CPU the model runs in bf16,
    which int8 in fp32 does not beat), else none; int8 and int8-encoder as set. int8 is a CPU's: none off it."""
    if not device.startswith("cpu"):
        return "none"
    if m.quantize == "auto":
        return "none" if cpu_has_bf16() else "int8-encoder"
    return m.quantize


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's out-of-memory RuntimeError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``); False where there is none to call.

    A model actor calls it between model calls (``pipeline/graph.py:TRIM_SECONDS``). glibc serves a large allocation
    with mmap and unmaps it on free, but each such free raises its mmap threshold to that size (up to 32 MiB), so that
    later tensors of up to 32 MiB come from the heap arenas, which keep what is freed: without trims a model actor's
    RSS kept growing through a 105-minute run (docs/performance.md#memory). Fixing the threshold instead (glibc's
    ``M_MMAP_THRESHOLD``) kept it flat but halved the model's speed (every tensor mapped and faulted in anew)."""
    trim = _malloc_trim()
    if not trim:
        return False
    trim(0)
    return True


_TRIM = None  # glibc's malloc_trim, once looked up (False: none)


def _malloc_trim():
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
        except (OSError, AttributeError):
            _TRIM = False
    return _TRIM


def auto_batch_size(model, device: torch.device, limit: int = 256) -> int:
    """Windows per batch that fit in the free memory of ``device`` (CUDA), else 16.

    Per window: the encoder's activations (about 8 tensors of n_audio_ctx x n_audio_state live at its peak, plus the
    MLP's 4x-wide one), the cross-attention K/V of every decoder layer, a full-length self-attention cache for five
    rows (beams or best-of samples), and the logits of five rows; half of the free memory is used, for the rest.
    """
    if device.type != "cuda":
        return 16
    d = model.dims
    size = torch.tensor([], dtype=model.dtype).element_size()
    encoder = d.n_audio_ctx * d.n_audio_state * 12
    cross = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state
    self_kv = 5 * 2 * d.n_text_layer * d.n_text_ctx * d.n_text_state
    logits = 5 * d.n_vocab * 4 // size
    per_window = (encoder + cross + self_kv + logits) * size
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(limit, int(free * 0.5 // per_window)))
