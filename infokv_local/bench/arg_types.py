"""Argument types the benchmarks' command lines share."""

from __future__ import annotations


def float_list(text: str) -> list[float]:
    """``"0.25,0.125"`` -> [0.25, 0.125] (an argparse type)."""
    return [float(x) for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    """``"128,256"`` -> [128, 256] (an argparse type)."""
    return [int(x) for x in text.split(",") if x.strip()]
