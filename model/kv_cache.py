"""An explicit, preallocated key/value cache for batched Whisper decoding.

The reference implementation caches keys and values with forward hooks keyed by ``nn.Linear`` modules and grows them
with ``torch.cat`` every step. Here the cache is a plain object the decoder writes into:

- self-attention K/V are preallocated for every decoder layer and every row for the whole decoding length;
- cross-attention K/V are computed once per batch of windows (one entry per *audio*, shared by the ``group`` rows —
  beams or best-of samples — decoded for that audio), so beams never copy the 1500-position encoder keys;
- ``length`` is the next write position and therefore the positional-embedding offset;
- audios whose encoder passes differ in length share one batch: the cross K/V are padded to the longest, and
  ``cross_lengths`` says how many positions of each are real; cross-attention reads each run of like-length audios
  against its own positions only (``KVCache.cross_runs``), so no audio sees another's padding;
- on the CPU in bf16/fp16 the self-attention keys are stored transposed, (..., d_head, max_len) in memory, and
  ``self_k`` is the (..., max_len, d_head) view of them: a step's ``q @ k^T`` (plain matmuls there, see
  ``whisper_batch.model.whisper.attention``) then reads the written prefix as it lies, where the plain layout made
  torch copy it out first (tiny.en, 8 rows, 125 positions: 0.23 -> 0.13 ms a layer, the same bits).

Rows are kept audio-major: row ``r`` decodes audio ``r // group``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    self_k: Tensor  # (n_layer, n_rows, n_head, max_len, d_head), preallocated
    self_v: Tensor
    cross_k: Tensor | None  # (n_layer, n_audio, n_head, n_audio_ctx, d_head), filled once per batch
    cross_v: Tensor | None
    group: int = 1  # rows per audio (beam size or best_of)
    length: int = 0  # tokens written so far = next position
    # per row, the padding tokens before its first real one (prompts of different lengths, left-padded); None: none
    pad: Tensor | None = None
    # per audio, its encoder positions (passes of several lengths in one batch); None: every audio all of cross_k's
    cross_lengths: list[int] | None = None
    # cross_lengths as runs of consecutive like-length audios (first, end, positions), set with them: read by every
    # layer at every step; None: one attention call for the whole batch
    cross_runs: list[tuple[int, int, int]] | None = None

    @classmethod
    def allocate(
        cls,
        n_layer: int,
        n_rows: int,
        n_head: int,
        d_head: int,
        max_len: int,
        group: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (n_layer, n_rows, n_head, max_len, d_head)
        return cls(
            self_k=empty_keys(shape, device, dtype),
            self_v=torch.empty(shape, device=device, dtype=dtype),
            cross_k=None,
            cross_v=None,
            group=group,
        )

    @property
    def n_rows(self) -> int:
        return self.self_k.shape[1]

    @property
    def max_len(self) -> int:
        return self.self_k.shape[3]

    def set_cross_lengths(self, lengths: list[int] | None, positions: int) -> None:
        """Each audio's encoder positions, of ``positions`` in the padded cross K/V."""
        self.cross_lengths = lengths
        self.cross_runs = runs_of(lengths, positions)

    def write_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values (n_rows, n_head, T, d_head) of ``layer`` at ``length``; return all so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"kv-cache overflow: {end} positions > preallocated {self.max_len}")
        self.self_k[layer, :, :, self.length : end] = k
        self.self_v[layer, :, :, self.length : end] = v
        return self.self_k[layer, :, :, :end], self.self_v[layer, :, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Beam search: row ``i`` continues from row ``rows[i]``; ``rows`` never crosses audios."""
        live = slice(0, self.length)
        self.self_k[:, :, :, live] = self.self_k[:, rows, :, live]
        self.self_v[:, :, :, live] = self.self_v[:, rows, :, live]

    def keep_audios(self, audios: Tensor) -> None:
        """Drop finished audios: keep only ``audios`` (indices into the current audios) and their rows."""
        rows = (audios[:, None] * self.group + torch.arange(self.group, device=audios.device)).flatten()
        live = slice(0, self.length)  # only the written prefix is worth copying
        shape = (self.self_k.shape[0], rows.numel(), *self.self_k.shape[2:])
        self_k, self_v = empty_keys(shape, self.self_k.device, self.self_k.dtype), self.self_v.new_empty(shape)
        self_k[:, :, :, live] = self.self_k[:, rows, :, live]
        self_v[:, :, :, live] = self.self_v[:, rows, :, live]
        self.self_k, self.self_v = self_k, self_v
        if self.pad is not None:
            self.pad = self.pad[rows]
        if self.cross_k is not None:
            self.cross_k = self.cross_k.index_select(1, audios)
            self.cross_v = self.cross_v.index_select(1, audios)
        if self.cross_lengths is not None:
            self.set_cross_lengths([self.cross_lengths[a] for a in audios.tolist()], self.cross_k.shape[3])


def empty_keys(shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """An uninitialised self-attention key buffer of ``shape`` (..., max_len, d_head): on the CPU in bf16/fp16 a
    transposed view of a (..., d_head, max_len) tensor (see the module's note), elsewhere a plain one (the fused
    kernels that fp32 and the GPU use want the head dimension contiguous, and fp32's bits stay the reference's)."""
    if torch.device(device or "cpu").type != "cpu" or dtype == torch.float32:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.empty(*shape[:-2], shape[-1], shape[-2], device=device, dtype=dtype).transpose(-1, -2)


def runs_of(lengths: Sequence[int] | None, positions: int) -> list[tuple[int, int, int]] | None:
    """Runs of consecutive equal ``lengths`` as (first, end, length); None when there are no lengths or every one is
    ``positions`` (the whole tensor, one call)."""
    if lengths is None or all(n == positions for n in lengths):
        return None
    runs: list[tuple[int, int, int]] = []
    for i, n in enumerate(lengths):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], i + 1, n)
        else:
            runs.append((i, i + 1, n))
    return runs


def every_run(lengths: Sequence[int] | None, n: int, positions: int) -> list[tuple[int, int, int]]:
    """:func:`runs_of` for ``n`` items, as one run of all ``positions`` where that gives None."""
    return runs_of(lengths, positions) or [(0, n, positions)]
