"""Checkpoints: safetensors round trip with metadata, atomic writes that never leave a half
file, and refusal (without executing anything) of pickles and other impostors."""

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from thermodiff.errors import UserError
from thermodiff.run import checkpoint as ckpt
from thermodiff.run.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    atomic_write_bytes,
    atomic_write_text,
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(3, 4, generator=g),
        "model.b": torch.randn(4, dtype=torch.float64, generator=g),
        "diffusion.steps": torch.arange(5),
        "rng.noise": torch.Generator().manual_seed(1).get_state(),  # uint8
        "scalar": torch.tensor(2.5),
    }


META = {"config": {"name": "x", "train": {"steps": 3, "lr": 1e-3}}, "step": 17, "K_bits_running": None,
        "data": {"scaling": {"shift": [0.5, 0.5], "scale": [2.0, 2.0]}, "source": "caf\u00e9.npy"}}


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    tensors = sample_tensors()
    save_checkpoint(path, tensors, META)
    loaded, record = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert torch.equal(loaded[k], v), k
    assert record["format"] == FORMAT and record["version"] == FORMAT_VERSION
    assert {k: record[k] for k in META} == META


def test_saves_tensors_that_need_grad_or_are_views(tmp_path):
    w = torch.randn(4, 6, requires_grad=True)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": w, "view": w.detach().t()[1:3]}, {})
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded["w"], w.detach()) and torch.equal(loaded["view"], w.detach().t()[1:3])


def test_optimizer_state_round_trip(tmp_path):
    """An Adam state saved and restored gives the same next step as the original."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).sum().backward()
        opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    tensors |= {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"optimizer": meta})
    loaded, record = load_checkpoint(tmp_path / "c.safetensors")

    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    opt2 = torch.optim.Adam(clone.parameters(), lr=0.5)
    opt2.load_state_dict(unflatten_optimizer_state(loaded, record["optimizer"]))
    assert opt2.param_groups[0]["lr"] == 0.1
    x = torch.randn(8, 3)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_real_training_checkpoint_loads(trained_run):
    tensors, record = load_checkpoint(trained_run["run_dir"] / "checkpoint.safetensors")
    assert record["step"] == trained_run["summary"]["steps"]
    assert record["config"]["name"] == "tiny"
    assert any(k.startswith("model.") for k in tensors) and "rng.noise" in tensors


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_creates_parents_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["out.bin"]
    atomic_write_text(tmp_path / "t.txt", "caf\u00e9\n")
    assert (tmp_path / "t.txt").read_bytes() == "caf\u00e9\n".encode("utf-8")


def test_atomic_write_file_permissions(tmp_path):
    """A new file gets 0666 less the umask (not mkstemp's private 0600); a replaced file keeps its mode."""
    old_umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644
        os.umask(0o027)
        atomic_write_bytes(tmp_path / "new2.bin", b"x")
        assert stat.S_IMODE((tmp_path / "new2.bin").stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)
    os.chmod(tmp_path / "new.bin", 0o604)
    atomic_write_bytes(tmp_path / "new.bin", b"y")
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o604


@pytest.mark.parametrize("fail_in", ["write", "fsync", "replace", "interrupt"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})
    before = path.read_bytes()

    class Boom(OSError):
        pass

    def fail(*args, **kwargs):
        raise KeyboardInterrupt if fail_in == "interrupt" else Boom("disk on fire")

    if fail_in == "write":
        # a file object whose write dies half way: some bytes reached the temporary file
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise Boom("no space left")

            f.write = write
            return f

        monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    elif fail_in in ("fsync", "interrupt"):
        monkeypatch.setattr(ckpt.os, "fsync", fail)
    else:
        monkeypatch.setattr(ckpt.os, "replace", fail)

    with pytest.raises(KeyboardInterrupt if fail_in == "interrupt" else Boom):
        save_checkpoint(path, {"w": torch.zeros(1000)}, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]  # the temporary file is gone
    tensors, record = load_checkpoint(path)
    assert record["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))


# --------------------------------------------------------------------------- impostors


class _Boom:
    """Unpickling this creates a directory (``marker``): evidence that code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _assert_payload_is_live(load, marker: Path):
    """Control: the payload really runs code when loaded the unsafe way."""
    load()
    assert marker.is_dir(), "the test payload is not live"
    marker.rmdir()


@pytest.mark.parametrize("kind", ["torch_save_zip", "torch_save_legacy", "pickle_protocol_0", "pickle_protocol_2",
                                  "pickle_default"])
def test_pickles_are_refused_without_executing_them(tmp_path, kind):
    marker = tmp_path / "executed"
    path = tmp_path / "checkpoint.safetensors"
    payload = {"model.w": torch.ones(2), "boom": _Boom(marker)}
    if kind.startswith("torch_save"):
        torch.save(payload, path, _use_new_zipfile_serialization=(kind == "torch_save_zip"))
        with open(path, "rb") as f:  # a file object: torch.load would treat a *.safetensors name specially
            _assert_payload_is_live(lambda: torch.load(f, weights_only=False), marker)
    else:
        protocol = {"pickle_protocol_0": 0, "pickle_protocol_2": 2, "pickle_default": None}[kind]
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        _assert_payload_is_live(lambda: pickle.loads(path.read_bytes()), marker)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists(), "load_checkpoint executed pickled code"


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_refused(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "checkpoint.safetensors"
    data = rng.bytes(int(rng.integers(0, 3000)))
    if seed == 0:
        data = b""
    if seed == 1:  # a plausible header length followed by garbage
        data = (200).to_bytes(8, "little") + rng.bytes(300)
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("metadata", [None, {"other": "x"}, {"thermodiff": "not json"}, {"thermodiff": "[1, 2]"},
                                      {"thermodiff": json.dumps({"format": "something-else", "version": 1})},
                                      {"thermodiff": json.dumps({"version": FORMAT_VERSION})}])
def test_safetensors_without_thermodiff_metadata_are_refused(tmp_path, metadata):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(save_safetensors({"w": torch.ones(2)}, metadata=metadata))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None, "1"])
def test_other_format_versions_are_refused(tmp_path, version):
    path = tmp_path / "checkpoint.safetensors"
    record = {"format": FORMAT, "version": version, "step": 1}
    path.write_bytes(save_safetensors({"w": torch.ones(2)}, metadata={"thermodiff": json.dumps(record)}))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "version" in str(e.value) and str(path) in str(e.value)


def test_truncated_checkpoint_is_refused(tmp_path, trained_run):
    data = (trained_run["run_dir"] / "checkpoint.safetensors").read_bytes()
    path = tmp_path / "checkpoint.safetensors"
    for cut in (7, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(UserError):
            load_checkpoint(path)


def test_missing_or_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "dir.safetensors")
