"""The machine a figure was measured on: written into every report and benchmark record."""

import os
import platform

import torch


def machine() -> dict:
    """The hardware and software of this process, with the load when the figure was taken."""
    return {"platform": platform.platform(), "processor": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def hardware() -> str:
    """:func:`machine` in one line, as reports name it."""
    m = machine()
    return f"{m['processor']} CPU ({m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads)"
