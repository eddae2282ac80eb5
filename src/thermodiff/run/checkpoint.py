"""Checkpoints: one safetensors file holding tensors plus a JSON metadata record.

Loading never executes code (safetensors has no pickle); writes are atomic (temporary file,
fsync, rename), so an interrupted save leaves the previous checkpoint intact.
"""

import json
import os
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from thermodiff.errors import UserError

FORMAT = "thermodiff-checkpoint"
FORMAT_VERSION = 1
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a raw pickle, or torch.save's zip container


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The replaced file's permissions, or those a new file gets (0666 less the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~umask()


def _name(e: OSError, path: Path) -> None:
    """Make ``e`` name the file being written, not its temporary file (which is gone)."""
    e.filename, e.filename2 = str(path), None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one; a
    failure (a full disk, a read-only folder) leaves the old one and no temporary file, and its
    OSError names ``path``, not the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its error names the part of the path in the way
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        _name(e, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode(path))  # mkstemp makes 0600; keep the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            _name(e, path)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    record = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors(tensors, metadata={"thermodiff": json.dumps(record)}))


def load_checkpoint(path: Path, required: dict[str, type] | None = None,
                    required_tensors: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is refused, as is a
    checkpoint whose record lacks a key of ``required`` (key -> type) or a tensor of
    ``required_tensors`` (written by another program or an older version)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        record = json.loads(header.get("__metadata__", {}).get("thermodiff", "null"))
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as e:
        # only now look for pickle magic: a valid safetensors file starts with its header length,
        # whose first byte is 0x80 for one header length in 32
        if data.startswith(_PICKLE_MAGIC):
            raise UserError(f"{path}: is a pickle / torch.save file; thermodiff loads only safetensors checkpoints "
                            "and never unpickles") from None
        raise UserError(f"{path}: not a valid safetensors checkpoint ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path}: not a thermodiff checkpoint")
    if record.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format version {record.get('version')} is not supported (this is {FORMAT_VERSION})")
    for key, kind in (required or {}).items():
        value = record.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # True is an int too
            raise UserError(f"{path}: checkpoint has no valid '{key}' entry (written by another program or version?)")
    missing = [name for name in required_tensors if name not in tensors]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)} (written by another program or version?)")
    return tensors, record
