"""The saw-tooth chart: KV cells in use over the conversation, with the budget and budget + buffer lines.

Returns a long-format pandas DataFrame for ``gr.LinePlot(x="token", y="cells", color="series")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

USED = "cells in use"
BUDGET = "budget"
PEAK = "budget + buffer"
#: Colours of the three series (also used as the plot's colour map).
COLORS = {USED: "#2563eb", BUDGET: "#dc2626", PEAK: "#f59e0b"}


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points that keep every bucket's minimum and maximum (the saw's teeth)."""
    if len(x) <= max_points:
        return x, y
    n_buckets = max(1, max_points // 2)
    keep: list[int] = []
    for idx in np.array_split(np.arange(len(x)), n_buckets):
        if len(idx) == 0:
            continue
        lo, hi = idx[np.argmin(y[idx])], idx[np.argmax(y[idx])]
        keep.extend(sorted({int(lo), int(hi)}))
    k = np.asarray(keep)
    return x[k], y[k]


def cache_frame(history: Sequence[tuple[int, int]], budget: int | None, buffer: int | None,
                max_points: int = 1200) -> pd.DataFrame:
    """The chart's data: ``history`` is ``[(token_index, used_cells), ...]`` after every engine step;
    the budget lines are left out when ``budget`` is None (the full cache)."""
    if len(history) == 0:
        x = np.array([0, 1])
        y = np.array([0, 0])
    else:
        arr = np.asarray(history, dtype=np.int64).reshape(-1, 2)
        x, y = _downsample(arr[:, 0], arr[:, 1], max_points)
    x0, x1 = int(x.min()), int(max(x.max(), x.min() + 1))
    frames = [pd.DataFrame({"token": x, "cells": y, "series": USED})]
    if budget is not None:
        frames.append(pd.DataFrame({"token": [x0, x1], "cells": [budget, budget], "series": BUDGET}))
        if buffer:
            frames.append(pd.DataFrame({"token": [x0, x1], "cells": [budget + buffer] * 2, "series": PEAK}))
    return pd.concat(frames, ignore_index=True)
