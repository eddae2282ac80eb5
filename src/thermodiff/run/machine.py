"""The machine a figure was measured on: written into every report and benchmark record."""

import os
import platform

import torch


def cpu_bf16_units() -> str | None:
    """This CPU's units that compute bf16 products natively (``"AMX"``, ``"AVX-512 BF16"``), or
    None: without them oneDNN has no bf16 kernels and torch's bf16 convolutions fall back to slow
    reference loops (the image default's U-Net trains an order of magnitude slower than in fp32 on
    an AVX2 CPU: benchmarks/results/throughput_cpu_avx2.json). torch asks cpuinfo (``torch.cpu``)."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() else None


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on fast kernels on ``device``: a CUDA device that supports it
    (compute capability 8.0 on), or a CPU with :func:`cpu_bf16_units`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_units() is not None


def machine() -> dict:
    """The hardware and software of this process, with the load when the figure was taken."""
    return {"platform": platform.platform(), "processor": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_bf16_units(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def hardware(device: torch.device = torch.device("cpu")) -> str:
    """:func:`machine` in one line, as reports name it, with the GPU where ``device`` is one."""
    m = machine()
    host = f"{m['processor']} CPU ({m['cpu_count']} cores, torch {m['torch']}, {m['threads']} threads)"
    if device.type != "cuda":
        return host
    return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}) on an {host}"
