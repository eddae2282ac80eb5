"""Issue 13, items 3 and 4: sizes that cannot fit are refused before anything is allocated or
written (with the estimate and the available memory in the one-line message, and an override);
checkpoints carry a checksum of every tensor and of their record, verified on load (old ones
without still load); non-finite weights are refused; no command exits 0 with a NaN figure."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from safetensors.torch import save as save_safetensors

from thermodiff.errors import UserError
from thermodiff.process.bound import BoundEstimate
from thermodiff.run import experiment, memory
from thermodiff.run.checkpoint import FORMAT, RECORD_DIGEST, TENSOR_DIGESTS, load_checkpoint, save_checkpoint
from thermodiff.run.config import load_config
from thermodiff.tasks import evaluation
from thermodiff.tasks.reports import require_finite

# --------------------------------------------------------------------------- checksums


def _tensor_offset(path, name: str) -> int:
    """Where tensor ``name``'s bytes begin in the safetensors file ``path``."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return 8 + header_len + json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]


def test_a_flipped_bit_in_a_weight_is_refused_naming_the_file_and_the_tensor(copy_run, cli):
    run = copy_run()
    path = run / "checkpoint.safetensors"
    name = next(k for k in load_checkpoint(path)[0] if k.startswith("model."))
    data = bytearray(path.read_bytes())
    data[_tensor_offset(path, name) + 1] ^= 0x04  # a low bit of a weight's mantissa: still a finite number
    path.write_bytes(bytes(data))
    err = assert_one_line_error(cli("evaluate", run, "--quiet"), str(path), repr(name), "corrupt")
    assert "good copy" in err


def test_every_single_bit_flip_is_refused_or_harmless(trained_run, tmp_path):
    """Bits flipped anywhere in a checkpoint (header, record, tensors): loading either refuses
    with a UserError or gives exactly the tensors and record written (a flip in the header's
    padding); never other numbers."""
    original = (trained_run["run_dir"] / "checkpoint.safetensors").read_bytes()
    tensors, record = load_checkpoint(trained_run["run_dir"] / "checkpoint.safetensors")
    path = tmp_path / "checkpoint.safetensors"
    rng = np.random.default_rng(0)
    refused = 0
    for position in rng.integers(0, len(original), 300):
        data = bytearray(original)
        data[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        try:
            got, got_record = load_checkpoint(path)
        except UserError:
            refused += 1
            continue
        assert got_record == record and set(got) == set(tensors), position
        assert all(torch.equal(got[k], tensors[k]) for k in tensors), position
    assert refused >= 290  # all but flips in the header's padding


def test_a_record_changed_on_disk_is_refused(tmp_path):
    """The record's own checksum: a changed number in the metadata (here the step) is caught."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, {"step": 17})
    data = path.read_bytes()
    assert data.count(b'step\\": 17') == 1  # the record is a JSON string in the header's JSON
    path.write_bytes(data.replace(b'step\\": 17', b'step\\": 18'))
    with pytest.raises(UserError, match="metadata record does not match its checksum"):
        load_checkpoint(path)


def _as_version_1(path) -> None:
    """Rewrite a checkpoint as version 1 wrote it: no checksums."""
    tensors, record = load_checkpoint(path)
    record["version"] = 1
    path.write_bytes(save_safetensors(tensors, metadata={"thermodiff": json.dumps(record)}))


def test_a_version_1_checkpoint_without_checksums_still_loads(copy_run, cli, trained_run):
    run = copy_run()
    _as_version_1(run / "checkpoint.safetensors")
    tensors, record = load_checkpoint(run / "checkpoint.safetensors")
    assert record["version"] == 1 and TENSOR_DIGESTS not in record
    old = cli("evaluate", run, "--quiet", "--json")
    new = cli("evaluate", trained_run["run_dir"], "--quiet", "--json")
    assert old.rc == new.rc == 0, old
    assert old.json()["K_bits"] == new.json()["K_bits"]


@pytest.mark.parametrize("strip", ["tensor digests", "record digest", "one tensor's digest"])
def test_a_version_2_checkpoint_without_its_checksums_is_refused(tmp_path, strip):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(2), "b": torch.zeros(3)}, {"step": 1})
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    tensors, record = load_checkpoint(path)
    record[TENSOR_DIGESTS] = json.loads(metadata["thermodiff"])[TENSOR_DIGESTS]
    if strip == "tensor digests":
        del record[TENSOR_DIGESTS]
    elif strip == "one tensor's digest":
        del record[TENSOR_DIGESTS]["b"]
    text = json.dumps(record)
    metadata = {"thermodiff": text}
    if strip != "record digest":
        import hashlib

        metadata[RECORD_DIGEST] = hashlib.sha256(text.encode()).hexdigest()
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    with pytest.raises(UserError, match="corrupt") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_a_version_1_record_in_a_file_with_a_record_checksum_is_verified(tmp_path):
    """A flip that made the version read 1 would skip the checks: the record's checksum is there."""
    path = tmp_path / "c.safetensors"
    text = json.dumps({"format": FORMAT, "version": 1, "step": 1})
    path.write_bytes(save_safetensors({"w": torch.ones(2)}, metadata={"thermodiff": text, RECORD_DIGEST: "0" * 64}))
    with pytest.raises(UserError, match="checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused(copy_run, cli, value):
    run = copy_run()
    path = run / "checkpoint.safetensors"
    tensors, record = load_checkpoint(path)
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = value
    save_checkpoint(path, tensors, {k: v for k, v in record.items() if k not in ("format", "version")})
    assert_one_line_error(cli("evaluate", run, "--quiet"), str(path), repr(name), "1 NaN or infinite value")
    assert_one_line_error(cli("sample", run, "-n", "5", "--out", run / "s.npy", "--quiet"), repr(name))
    assert not (run / "s.npy").exists()


def test_a_corrupt_best_checkpoint_says_how_to_use_the_last_weights(copy_run, cli):
    run = copy_run()
    (run / experiment.BEST_CHECKPOINT).write_bytes((run / "checkpoint.safetensors").read_bytes())
    path = run / experiment.BEST_CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert_one_line_error(cli("evaluate", run, "--quiet"), str(path), "corrupt", "move it aside", "checkpoint.safetensors")


# --------------------------------------------------------------------------- no NaN figure


def test_a_nan_bound_fails_instead_of_reporting_nan(trained_run, cli, monkeypatch):
    real = evaluation.exact_bound

    def nan_for_three(*args, **kwargs) -> BoundEstimate:
        estimate = real(*args, **kwargs)
        estimate.per_example[:3] = math.nan
        return estimate

    monkeypatch.setattr(evaluation, "exact_bound", nan_for_three)
    r = cli("evaluate", trained_run["run_dir"], "--quiet", "--json")
    assert_one_line_error(r, str(trained_run["run_dir"]), "not finite for 3 of 40 examples", "diverged")
    assert set(json.loads(r.out)) == {"command", "error", "exit_code"}  # --json: the error, and no figure


def test_require_finite_names_the_figure():
    assert require_finite({"K_bits": 1.0, "stderr_bits": None, "terms": [1.0, 2.0]}, "run") is not None
    with pytest.raises(UserError, match=r"run: terms\[1\] is nan \(1 figure"):
        require_finite({"K_bits": 1.0, "terms": [1.0, math.nan], "n": 3}, "run")
    with pytest.raises(UserError, match=r"continuous_time.K_bits is inf"):
        require_finite({"continuous_time": {"K_bits": math.inf}}, "run")


def test_one_example_has_no_standard_error_rather_than_nan(trained_run, cli):
    r = cli("evaluate", trained_run["run_dir"], "--max-examples", "1", "--quiet")
    assert r.rc == 0, r
    assert "nan" not in r.out.lower() and "1 example: no standard error" in r.out
    record = cli("evaluate", trained_run["run_dir"], "--max-examples", "1", "--quiet", "--json").json()
    assert record["stderr_bits"] is None and record["K_minus_L_null_stderr_bits"] is None
    assert math.isfinite(record["K_bits"])


# --------------------------------------------------------------------------- sizes that cannot fit


def _thermodiff(*args, cwd) -> subprocess.CompletedProcess:
    # the timeout only keeps a regression (an allocation instead of a refusal) from hanging the suite
    return subprocess.run([sys.executable, "-m", "thermodiff", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("flag", [["--T", "1000000000"], ["--set", "train.batch_size=1000000000"]], ids=["T", "batch"])
def test_huge_training_sizes_are_refused_before_anything_is_written(tiny_config, tmp_path, flag):
    """In a real process: exit 2, one line with the estimate and the available memory, and no
    run directory (nor its staging folder, nor the parent folder its lock needed)."""
    r = _thermodiff("train", tiny_config, "--out", tmp_path / "new" / "run", "--quiet", *flag, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "training needs about" in r.stderr and "is available" in r.stderr and "--ignore-memory-check" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_huge_sample_count_is_refused_before_sampling(trained_run, tmp_path):
    r = _thermodiff("sample", trained_run["run_dir"], "-n", 10**9, "--out", tmp_path / "s.npy", "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "sampling 1000000000 examples needs about" in r.stderr and "-n" in r.stderr
    assert not (tmp_path / "s.npy").exists()


def _available(monkeypatch, size: int) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (size, "test"))


@pytest.fixture
def little_memory(monkeypatch):
    """The machine has 1 KiB available."""
    _available(monkeypatch, 1024)


def test_a_refused_run_leaves_nothing_and_the_override_lets_it_through(tiny_config, tmp_path, cli, little_memory):
    """The tiny run needs more than 1 KiB: refused, and trained with --ignore-memory-check."""
    r = cli("train", tiny_config, "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(r, "training needs about", "1 KiB is available (test)", "--ignore-memory-check")
    assert not (tmp_path / "run").exists()
    assert cli("train", tiny_config, "--out", tmp_path / "run", "--quiet", "--ignore-memory-check").rc == 0
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_sample_refused_in_little_memory_and_allowed_with_the_override(trained_run, tmp_path, cli, little_memory):
    out, n = tmp_path / "s.npy", ("-n", "20000", "--batch-size", "5000")
    assert_one_line_error(cli("sample", trained_run["run_dir"], *n, "--out", out, "--quiet"),
                          "20000 samples (4 copies) 1.22 MiB")  # of 20000 x 2 float64
    assert not out.exists()
    r = cli("sample", trained_run["run_dir"], *n, "--out", out, "--quiet", "--ignore-memory-check")
    assert r.rc == 0 and np.load(out).shape == (20000, 2)


def test_a_batch_whose_activations_cannot_fit_is_refused_after_the_build(tiny_config, tmp_path, cli, monkeypatch):
    """10^5 examples of 2 numbers (4.6 MiB as drawn) pass the check made before the build; the
    activations measured on the network built are refused, still before any file is written."""
    _available(monkeypatch, 20 * 2**20)
    r = cli("train", tiny_config, "--out", tmp_path / "run", "--quiet", "--set", "train.batch_size=100000")
    assert_one_line_error(r, "the batch's activations", "the batch 4.58 MiB", "20 MiB is available (test)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_parzen_refuses_a_huge_sample_count(tiny_images, tmp_path, cli):
    assert cli("train", tiny_images, "--out", tmp_path / "run", "--quiet").rc == 0
    r = cli("parzen", tmp_path / "run", "--samples", 10**9, "--valid", "5", "--quiet")
    assert_one_line_error(r, "the Parzen estimate on 1000000000 samples needs about", "--samples")
    assert not (tmp_path / "run" / "parzen.json").exists()


def test_the_state_extrapolated_from_small_T_is_the_state_built(tiny_config):
    """What grows with T is linear in T: the estimate at T = 300 is the built state's bytes."""
    for readout in ("per_step", "bumps"):
        cfg = load_config(str(tiny_config), ["diffusion.T=300", f"model.readout={readout}", "diffusion.schedule=learned"])
        dataset, kind = experiment.prepare_dataset(cfg)
        parts = experiment.assemble(cfg)
        assert (experiment.state_bytes_at_T(cfg, dataset, kind, float(dataset.train.mean()))
                == memory.state_bytes([parts.diffusion, parts.model]))


def test_the_check_does_not_change_the_run(tiny_config, tmp_path):
    """The probes draw from the global generator under fork_rng: the initial weights are the config's."""
    cfg = load_config(str(tiny_config))
    checked = experiment.assemble(cfg, memory_device=torch.device("cpu"))
    after_checked = torch.random.get_rng_state()  # what the training's first draws start from
    unchecked = experiment.assemble(cfg)
    assert torch.equal(after_checked, torch.random.get_rng_state())
    for a, b in zip(checked.model.state_dict().values(), unchecked.model.state_dict().values()):
        assert torch.equal(a, b)


def test_available_memory_respects_a_cgroup_limit(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    8000000 kB\n")
    (tmp_path / "memory.max").write_text("3000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    monkeypatch.setattr(memory, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "_CGROUPS", ((tmp_path / "memory.max", tmp_path / "memory.current"),))
    assert memory.available_memory() == (2_000_000_000, "the cgroup's memory limit less its usage")
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.available_memory() == (8_000_000 * 1024, "MemAvailable in /proc/meminfo")


def test_saved_bytes_counts_the_activations_not_the_weights():
    layer = torch.nn.Linear(100, 50)
    x = torch.randn(8, 100, requires_grad=True)
    saved = memory.saved_bytes(lambda: torch.tanh(layer(x)).sum(), layer.parameters())
    assert saved == (8 * 100 + 8 * 50) * 4  # the input of the matmul and tanh's output
