"""Prune to a latency target, with a per-layer latency lookup table (HALP-style).

FLOPs are a poor proxy for speed: a layer pruned from 64 to 61 channels can get slower on
hardware that computes in blocks of 8 or 16. This module measures instead:

* :func:`build_latency_table` times, for every prunable group, a small sub-model made of the
  group's own layers (every Conv/ConvTranspose/Gemm/MatMul whose weight the group slices, in
  isolation, at the input shapes they see in the model) at candidate channel counts, on the
  chosen backend. Tables are cached per model hash and backend in
  ``$GRAPHPRUNE_LATENCY_CACHE`` (default ``~/.cache/graphprune/latency``).
* :class:`LatencyRoundPass` runs after ``allocate`` and moves each pruned group's channel
  count, within ``window`` (a fraction of the group, at least one round-to step), to the
  count that is fastest for its width: the table's local minimum once the group's linear
  trend is removed (a width the hardware runs unusually fast wins; a slow odd width loses).
* :func:`prune_to_latency` searches the FLOPs target (secant steps inside a bisection
  bracket) that gives the largest model whose *measured* latency is at most ``R`` x the
  original's, prunes with the table's rounding, measures the result against the original
  (interleaved runs) and records the measured ratio in ``report["latency"]``.

The package: cache.py (cache folder and keys), layers.py (layer sub-models), table.py (the
lookup table), round_pass.py (the rounding pass), search.py (the latency-target search).
"""
from __future__ import annotations

from .cache import LUT_VERSION, latency_cache_dir, model_digest
from .round_pass import LatencyRoundPass
from .search import latency_vs_flops, measure_ratio, prune_to_latency
from .table import LatencyTable, build_latency_table

__all__ = ["LatencyTable", "LatencyRoundPass", "build_latency_table", "prune_to_latency", "latency_vs_flops",
           "latency_cache_dir", "model_digest", "measure_ratio", "LUT_VERSION"]
