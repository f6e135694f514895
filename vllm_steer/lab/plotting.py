"""matplotlib, optional (``pip install 'vllm-steer[plots]'``): the sweep and the benchmarks
draw PNGs with it when it is installed, and write their tables and JSON either way."""

from __future__ import annotations


def pyplot(what: str = "plots"):
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None after a one-line
    message when matplotlib is not installed."""
    try:
        import matplotlib  # optional: matplotlib (the plots extra)
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install 'vllm-steer[plots]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    return plt
