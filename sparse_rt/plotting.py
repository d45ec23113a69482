"""matplotlib for files only: experiments and benchmarks write PNGs, and servers have no display."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot with the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
