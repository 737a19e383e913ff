"""Developers' measurement tools (benchmarks, yardstick, time splits, scale and GPU checks): run from a checkout as
``python -m benchmarks.NAME``; not part of the installed package."""
