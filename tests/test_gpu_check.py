"""benchmarks/gpu_check.py, rehearsed on the CPU as a developer does before a device call: every
step of the prepared GPU check but the tests (this suite runs them), each cut to seconds, on random
CIFAR-sized images, must pass and leave its record, so that no device time is spent finding a
broken flag."""

import json

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_the_rehearsal_runs_every_step_and_records_it(gpu_check, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in ((gpu_check.TRAIN_FILE, 64), (gpu_check.TEST_FILE, 16)):
        np.savez_compressed(data / name, images=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
    steps = [name for name in gpu_check.STEPS if name != "tests"]  # tests/test_devices.py is in this suite
    rc = gpu_check.main(["--device", "cpu", "--quick", "--data", str(data), "--out", str(out), "--runs", str(tmp_path),
                         "--only", ",".join(steps)])
    record = json.loads((out / "gpu_check.json").read_text())
    failed = {name: step["stderr_tail"][-500:] for name, step in record["steps"].items() if step["rc"] != 0}
    assert rc == 0 and not failed, failed
    assert list(record["steps"]) == steps
    assert record["steps"]["evaluation"]["report"]["device"] == "cpu"
    assert record["steps"]["sample"]["report"]["device"] == "cpu"
    throughput = json.loads((out / "throughput_gpu.json").read_text())
    assert all(m["utilisation_pct"] > 0 for m in throughput["measurements"])
    assert (out / "gpu_check_samples.png").stat().st_size > 0


@pytest.mark.parametrize("argv, needle", [([], "--prepare"), (["--only", "train,lunch"], "--only")])
def test_a_check_that_cannot_run_says_why_and_writes_nothing(gpu_check, tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit):
        gpu_check.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), *argv])
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_each_device_call_fits_in_the_device_tools_limit(gpu_check, tmp_path):
    limits = {name: limit for name, _, limit in gpu_check.steps("cuda", False, tmp_path, tmp_path, tmp_path)}
    assert sorted(name for group in gpu_check.GROUPS for name in group) == sorted(gpu_check.STEPS) == sorted(limits)
    for group in gpu_check.GROUPS:
        assert sum(limits[name] for name in group) < gpu_check.CALL_LIMIT_S, group
