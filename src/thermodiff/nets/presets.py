"""Named network presets: each an options dataclass, written once, that a config may override."""

from dataclasses import fields, replace
from typing import TypeVar

Options = TypeVar("Options")


def from_preset(network: str, presets: dict[str, Options], preset: str, overrides: dict) -> Options:
    """``presets[preset]`` with ``overrides`` replacing its options; a ValueError names the valid
    presets or options of ``network`` (e.g. "U-Net") for an unknown one."""
    if preset not in presets:
        raise ValueError(f"unknown {network} preset {preset!r}; choose from {sorted(presets)}")
    valid = [f.name for f in fields(presets[preset])]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown {network} option(s) {unknown}; valid options: {sorted(valid)}")
    return replace(presets[preset], **overrides)
