"""The int8 products this CPU offers against its fp32 matmul, on tiny.en's shapes, one thread.

    python -m benchmarks.int8_kernels [--repeats 3]

Prints, per shape (M x K x N: rows x input x output), the best time of 10 calls for the fp32 matmul, ``torch._int_mm``
and torch's dynamic int8 linear (the engine torch picks, FBGEMM's kernels on x86), and the CPU features that decide
which of the int8 products ``model.quantize=int8`` uses (``whisper_batch.model.quantize.int8_kernel``).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from whisper_batch.model.quantize import int8_kernel, quantize_rows
from whisper_batch.model.torch_compat import (
    dynamic_int8_linear,
    dynamic_int8_works,
    int_mm,
    int_mm_works,
    prepack_dynamic_int8,
    vnni,
)

# (rows, in, out): an encoder MLP pass over one 20 s window both ways, the vocabulary projection and a decoder MLP layer
# for a decoding step of 16 rows
SHAPES = [(1000, 384, 1536), (1000, 1536, 384), (16, 384, 51864), (16, 384, 1536)]


def best_ms(f: Callable[[], object], repeats: int, calls: int = 10) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, VNNI {vnni()}, quantized engine "
          f"{torch.backends.quantized.engine}; int8 kernel picked: {int8_kernel()}")
    print("| M x K x N | fp32 ms | GFLOPS | torch._int_mm ms | dynamic int8 ms |")
    print("|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        wt = w.t().contiguous()
        q, scale = quantize_rows(w)
        qt = q.t().contiguous()  # the layout torch._int_mm reads fastest, as Int8Linear keeps it
        xq, _ = quantize_rows(x)
        fp32 = best_ms(functools.partial(torch.matmul, x, wt), args.repeats)
        mm = best_ms(functools.partial(int_mm, xq, qt), args.repeats) if int_mm_works() else float("nan")
        if dynamic_int8_works():
            packed = prepack_dynamic_int8(q, scale)
            dyn = best_ms(functools.partial(dynamic_int8_linear, x, packed), args.repeats)
        else:
            dyn = float("nan")
        print(f"| {m} x {k} x {n} | {fp32:.2f} | {2 * m * k * n / fp32 / 1e6:.0f} | {mm:.2f} | {dyn:.2f} |")


if __name__ == "__main__":
    main()
