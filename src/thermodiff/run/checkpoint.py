"""Checkpoints: one safetensors file holding tensors plus a JSON metadata record.

Loading never executes code (safetensors has no pickle); writes are atomic (temporary file,
fsync, rename), so an interrupted save leaves the previous checkpoint intact. Since format
version 2 the record holds a sha256 of every tensor (its dtype, shape and bytes) and the header
a sha256 of the record, so that a flipped bit anywhere is refused on load instead of evaluated;
version 1 checkpoints (no checksums) still load. Non-finite floating-point tensors are refused
whatever the version: a diverged run's weights would only give NaN figures.
"""

import hashlib
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
FORMAT_VERSION = 2  # 2: checksums (TENSOR_DIGESTS, RECORD_DIGEST); 1: none
READABLE_VERSIONS = (1, 2)
TENSOR_DIGESTS = "tensor_sha256"  # the record's key: tensor name -> tensor_digest
RECORD_DIGEST = "thermodiff.sha256"  # the header's key beside "thermodiff": the sha256 of the record's JSON
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


class CorruptCheckpoint(UserError):
    """A checkpoint whose bytes differ from those written (a checksum does not match)."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's dtype, shape and bytes (as safetensors stores them, C order)."""
    digest = hashlib.sha256(f"{tensor.dtype} {list(tensor.shape)} ".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # the digests last: a record read from another checkpoint must not bring its own
    record = {"format": FORMAT, "version": FORMAT_VERSION, **meta,
              TENSOR_DIGESTS: {name: tensor_digest(t) for name, t in tensors.items()}}
    text = json.dumps(record)
    metadata = {"thermodiff": text, RECORD_DIGEST: hashlib.sha256(text.encode()).hexdigest()}
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))


def verify_checksums(path: Path, tensors: dict[str, torch.Tensor], header: dict, record: dict) -> None:
    """Refuse a version-2 checkpoint whose record or a tensor differs from what was written."""
    corrupt = f"the file is corrupt (changed since it was written); restore {path.name} from a good copy"
    text = header["__metadata__"]["thermodiff"]
    if header["__metadata__"].get(RECORD_DIGEST) != hashlib.sha256(text.encode()).hexdigest():
        raise CorruptCheckpoint(f"{path}: its metadata record does not match its checksum: {corrupt}")
    digests = record.get(TENSOR_DIGESTS)
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise CorruptCheckpoint(f"{path}: its tensors do not match the list of checksums: {corrupt}")
    for name, tensor in tensors.items():
        if tensor_digest(tensor) != digests[name]:
            raise CorruptCheckpoint(f"{path}: tensor {name!r} does not match its checksum: {corrupt}")


def refuse_nonfinite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite values in any floating-point tensor (weights, optimiser state)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise UserError(f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()} "
                                "(the run diverged); use an earlier checkpoint, or train again with a lower train.lr "
                                "or train.grad_clip")


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
    version = record.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise UserError(f"{path}: checkpoint format version {version} is not supported (this version of thermodiff "
                        f"reads {', '.join(map(str, READABLE_VERSIONS))})")
    if version >= 2 or RECORD_DIGEST in header["__metadata__"]:  # a version 1 record of a version 2 file too
        verify_checksums(path, tensors, header, record)
    record.pop(TENSOR_DIGESTS, None)  # checked; a record saved again gets digests of its own tensors
    refuse_nonfinite(path, tensors)
    for key, kind in (required or {}).items():
        value = record.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # True is an int too
            raise UserError(f"{path}: checkpoint has no valid '{key}' entry (written by another program or version?)")
    missing = [name for name in required_tensors if name not in tensors]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)} (written by another program or version?)")
    return tensors, record
