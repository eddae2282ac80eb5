"""Messages that say what is wrong and what to do, and no silent surprises (issue 13, items 7-9):
each misleading message and each surprise the issue lists, the JSON object of an error under
--json, and a command line that starts without torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_STEPS, assert_one_line_error
from PIL import Image

from thermodiff.data.dataset import load_array
from thermodiff.errors import UserError
from thermodiff.run.checkpoint import load_checkpoint, save_checkpoint
from thermodiff.run.experiment import paper_experiments
from test_reliability import snapshot

# --------------------------------------------------------------------------- misleading messages


@pytest.mark.parametrize("config", ["tiny", "vectors"])
def test_huge_values_are_too_large_not_zero_variance(config, tiny_config, cli, tmp_path):
    np.save(tmp_path / "huge.npy", np.random.default_rng(0).standard_normal((100, 2)) * 1e300)
    r = cli("train", tiny_config if config == "tiny" else "vectors", "--data", tmp_path / "huge.npy", "--steps", "1",
            "--out", tmp_path / "run")
    err = assert_one_line_error(r, "huge.npy", "too large", "divide the data")  # one line: no numpy warning either
    assert "variance in some" not in err and not (tmp_path / "run").exists()


def test_constant_data_name_the_constant_dimension(tiny_config, cli, tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 3))
    x[:, 1] = 7.0
    np.save(tmp_path / "flat.npy", x)
    r = cli("train", tiny_config, "--data", tmp_path / "flat.npy", "--set", "data.scaling=per_dimension")
    assert_one_line_error(r, "flat.npy", "constant in dimension 1", "zero variance", "data.scaling = 'none'")


def rewrite_checkpoint(run_dir, edit) -> None:
    path = run_dir / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(path)
    edit(tensors, meta)
    save_checkpoint(path, tensors, meta)


def test_a_zero_scale_in_a_checkpoint_is_a_damaged_checkpoint(copy_run, cli, tmp_path):
    run = copy_run()
    rewrite_checkpoint(run, lambda tensors, meta: meta["data"]["scaling"].update(scale=[0.0]))
    err = assert_one_line_error(cli("sample", run, "--out", tmp_path / "s.npy"), "checkpoint.safetensors",
                                "scaling is not valid", "[0.0]", "damaged")
    assert "variance" not in err


def test_a_3d_array_for_vectors_says_vectors_need_2d(cli, tmp_path):
    np.save(tmp_path / "cube.npy", np.random.default_rng(0).standard_normal((50, 3, 4)))
    r = cli("train", "vectors", "--data", tmp_path / "cube.npy", "--steps", "1", "--out", tmp_path / "run")
    assert_one_line_error(r, "cube.npy", "vectors need a 2-D (N, D) array", "(50, 3, 4)", "train images")


@pytest.mark.parametrize("args", [["train", "TINY", "--seed", str(2**70)], ["train", "TINY", "--set", f"seed={2**70}"],
                                  ["sample", "RUN", "--seed", str(2**70), "--out", "s.npy"]])
def test_a_seed_beyond_64_bits_names_the_range(args, tiny_config, trained_run, cli):
    args = [{"TINY": tiny_config, "RUN": trained_run["run_dir"]}.get(a, a) for a in args]
    err = assert_one_line_error(cli(*args), "seed", "0 .. 2**32 - 1", str(2**70))
    assert "expected int" not in err


@pytest.mark.parametrize("flag, text, words", [
    ("--minutes", "abc", ["a number of minutes", "'abc'"]), ("--minutes", "0", ["be positive", "0"]),
    ("--minutes", "inf", ["be positive", "inf"]), ("--seed", "x", ["an integer", "'x'"]),
    ("--seed", "-1", ["0 .. 2**32 - 1", "-1"])])
def test_a_bad_number_flag_says_what_it_wants_and_what_it_got(flag, text, words, tiny_config, cli, tmp_path):
    """Both ways a number flag fails (not a number, out of its range) are one line naming the flag; nothing is written."""
    out = tmp_path / "run"
    assert_one_line_error(cli("train", tiny_config, flag, text, "--out", out), flag, *words)
    assert not out.exists()


def test_compare_into_an_existing_out_suggests_what_compare_accepts(trained_run, cli, tmp_path):
    out = tmp_path / "cmp"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny" / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    r = cli("compare", trained_run["config"], "--out", out, "--steps", "2", "--quiet")
    err = assert_one_line_error(r, "--out", "tiny", "--overwrite", "thermodiff train")
    assert "pass --resume" not in err and snapshot(tmp_path) == before


def test_a_state_dict_mismatch_is_summarised_in_one_line(copy_run, cli, tmp_path):
    run = copy_run()

    def edit(tensors, meta):
        names = sorted(k for k in tensors if k.startswith("model."))
        tensors.pop(names[0])
        tensors["model.stray"] = tensors[names[1]].clone()
        tensors[names[2]] = tensors[names[2]].reshape(-1)[:1].clone()

    (run / "best.safetensors").unlink(missing_ok=True)
    rewrite_checkpoint(run, edit)
    assert_one_line_error(cli("sample", run, "--out", tmp_path / "s.npy"), "1 missing", "1 unexpected (stray)",
                          "1 of another shape", "(1,) vs")


def test_the_reproduce_error_lists_every_paper_experiment(cli):
    err = assert_one_line_error(cli("reproduce", "vectors"), "'vectors'")
    assert {"swissroll_paper", "heartbeat_paper", "cifar10_unet", "bark"} <= set(paper_experiments())
    assert all(name in err for name in paper_experiments())


def test_inpaint_help_describes_its_own_out(cli):
    inpaint, denoise = cli("inpaint", "--help").out, cli("denoise", "--help").out
    assert "denoise" not in inpaint and "E[x | y]" not in inpaint and "_inpainted.npz" in inpaint
    assert "E[x | y]" in denoise and "_denoised.npz" in denoise


def test_a_mixed_size_image_folder_names_the_option(cli, tmp_path):
    (tmp_path / "faces").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "faces" / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "faces" / "b.png")
    r = cli("train", "images", "--data", tmp_path / "faces", "--steps", "1", "--out", tmp_path / "run")
    assert_one_line_error(r, "b.png", "9 x 8", "data.size", "--set data.size=")


# --------------------------------------------------------------------------- silent surprises


def test_resume_below_the_current_step_is_refused_and_at_it_says_nothing_was_trained(copy_run, cli, tiny_config):
    run = copy_run()
    before = snapshot(run)
    r = cli("train", tiny_config, "--out", run, "--resume", "--steps", "5")
    assert_one_line_error(r, str(run), f"already at step {TINY_STEPS}", f"--steps above {TINY_STEPS}")
    assert snapshot(run) == before
    r = cli("train", tiny_config, "--out", run, "--resume", "--steps", TINY_STEPS, "--quiet")
    assert r.rc == 0 and r.out.startswith(f"nothing trained: {run} is already at step {TINY_STEPS}"), r


def test_csv_integers_that_float64_rounds_are_refused(tmp_path):
    big = tmp_path / "ids.csv"
    big.write_text("id,count\n" + "".join(f"{2**70 + 1 + i},{i}\n" for i in range(5)))  # 2**70 itself is exact
    with pytest.raises(UserError, match=rf"ids.csv: line 2 holds the integer {2**70 + 1}, which float64 cannot hold"):
        load_array(big)
    exact = tmp_path / "exact.csv"  # 16 digits, still below 2**53: loaded as it is
    exact.write_text("".join(f"{1234567890123456 + i},{-i}\n" for i in range(5)))
    assert load_array(exact)[4, 0] == 1234567890123460


@pytest.mark.parametrize("mask, accepted", [([0.5, -2.0], False), ([1.0, 2.0], False), ([True, False], True)])
def test_an_inpainting_mask_is_zero_or_one(trained_run, cli, tmp_path, mask, accepted):
    np.save(tmp_path / "x.npy", np.array([0.5, -0.3]))
    np.save(tmp_path / "m.npy", np.array(mask))
    r = cli("inpaint", trained_run["run_dir"], "--input", tmp_path / "x.npy", "--mask", tmp_path / "m.npy", "--out",
            tmp_path / "i.npz", "--quiet")
    if accepted:
        assert r.rc == 0, r
    else:
        assert_one_line_error(r, "m.npy", "1 (known) and 0 (unknown) only")
        assert not (tmp_path / "i.npz").exists()


@pytest.mark.parametrize("sigma", ["inf", "nan", "0", "-1"])
@pytest.mark.parametrize("method", ["product", "start"])
def test_denoise_refuses_a_sigma_that_is_not_positive_and_finite(trained_run, cli, tmp_path, sigma, method):
    np.save(tmp_path / "y.npy", np.array([0.5, -0.3]))
    r = cli("denoise", trained_run["run_dir"], "--input", tmp_path / "y.npy", "--sigma", sigma, "--method", method,
            "--out", tmp_path / "d.npz")
    assert_one_line_error(r, "--sigma", "positive and finite", sigma)
    assert not (tmp_path / "d.npz").exists()


# --------------------------------------------------------------------------- --json errors and start-up


def test_an_error_under_json_is_one_json_object_on_stdout_too(trained_run, cli, tmp_path):
    r = cli("sample", tmp_path / "nowhere", "--out", tmp_path / "s.npy", "--json")
    err = assert_one_line_error(r, "no such run directory")
    assert r.json() == {"command": "sample", "error": err.strip().removeprefix("thermodiff sample: error: "),
                        "exit_code": 2}
    assert cli("sample", tmp_path / "nowhere", "--out", tmp_path / "s.npy").out == ""  # without --json, nothing


@pytest.mark.parametrize("args", [["evaluate", "--json"], ["evaluate", "RUN", "--draws", "x", "--json"], ["--json"]])
def test_a_usage_error_under_json_is_one_json_object_too(args, trained_run, cli):
    r = cli(*[trained_run["run_dir"] if a == "RUN" else a for a in args])
    assert r.rc == 2 and r.err.count("\n") == 1 and "usage:" not in r.err, r
    record = r.json()
    assert record["exit_code"] == 2 and record["error"] in r.err
    assert record["command"] == (None if args == ["--json"] else "evaluate")


def test_the_command_line_imports_neither_torch_nor_numpy():
    """What --help needs (the parser) loads no heavy module: each command imports its own."""
    code = ("import sys, thermodiff.cli; thermodiff.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'thermodiff.run.experiment') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_the_packages_entry_points_still_import_from_it():
    import thermodiff

    assert all(getattr(thermodiff, name).__name__ == name for name in thermodiff.__all__)
    with pytest.raises(AttributeError):
        thermodiff.no_such_name  # noqa: B018


@pytest.mark.parametrize("steps, minutes, flags", [(500, 0.0, ["--steps", "500"]), (0, 30.0, ["--minutes", "30"]),
                                                   (500, 2.5, ["--steps", "500", "--minutes", "2.5"]),
                                                   (0, 0.0, ["--steps", "0"])])
def test_the_resume_command_of_a_stopped_run_keeps_its_limits(steps, minutes, flags):
    """A time-budgeted run stopped by a signal is continued with its minutes, not with --steps 0."""
    from thermodiff.run.stopping import RunStopped

    assert RunStopped.by_signal(15, Path("run"), 7, steps, minutes).limits() == flags
