"""Two CPU processes under torchrun (gloo) train in sync, and match one process on the same
global batch: every process draws the global batch and its noise, and takes its shard."""

import os
import subprocess
import sys
import textwrap

import torch
from conftest import write_tiny_images

from thermodiff.run.checkpoint import load_checkpoint
from thermodiff.run.config import load_config
from thermodiff.run.experiment import assemble

WORKER = textwrap.dedent("""
    import functools
    import os
    import sys
    from pathlib import Path
    import torch
    from thermodiff.run import distributed
    from thermodiff.run.config import load_config
    from thermodiff.run.training import train

    if "COMPILE_BACKEND" in os.environ:  # a stand-in for inductor, as test_training.eager_compile's
        torch.compile = functools.partial(torch.compile, backend=os.environ["COMPILE_BACKEND"])
    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if "RANK" in __import__("os").environ:
        # let every process write its own checkpoint, so the test can compare them
        rank = int(__import__("os").environ["RANK"])
        distributed.Context.is_main = property(lambda self: True)
        out = out / f"rank{rank}"
    train(load_config(config, overrides), out, progress=False, device="cpu")
""")


def run_worker(tmp_path, config, out, nproc: int, overrides: tuple[str, ...] = (), env: dict | None = None) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    args = [str(script), str(config), str(out), *overrides]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run_dir / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "diffusion."))}


def train_one_and_two_processes(tmp_path, config, overrides: tuple[str, ...] = (), env: dict | None = None) -> dict:
    """Train ``config`` in one process and in two under torchrun: the two end with equal
    weights, and those of one process; returns them."""
    run_worker(tmp_path, config, tmp_path / "single", 1, overrides, env)
    run_worker(tmp_path, config, tmp_path / "ddp", 2, overrides, env)
    single, rank0, rank1 = (weights(p) for p in (tmp_path / "single", tmp_path / "ddp/rank0", tmp_path / "ddp/rank1"))
    assert single.keys() == rank0.keys() == rank1.keys()
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"{key}: processes out of sync")
        # the all-reduce sums gradients in another order: equal up to float rounding, amplified by the Adam steps
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=f"{key}: DDP != one process")
    return single


def test_two_gloo_processes_stay_in_sync_and_match_one_process(tmp_path):
    config = tmp_path / "ddp.toml"
    config.write_text(textwrap.dedent("""
        name = "ddp"
        seed = 3
        [data]
        source = "swissroll"
        n = 600
        [diffusion]
        T = 8
        schedule = "learned"
        beta_1 = 1e-3
        [model]
        network = "mlp"
        hidden = 32
        layers = 2
        readout = "bumps"
        n_basis = 4
        [train]
        steps = 15
        batch_size = 64
        lr = 1e-2
        checkpoint_every = 100
    """))
    single = train_one_and_two_processes(tmp_path, config)
    assert any("logit_rest" in k for k in single)  # the learned schedule is synchronised too
    # and training moved the weights well away from their shared initialisation
    initial = {f"model.{k}": v for k, v in assemble(load_config(str(config))).model.state_dict().items()}
    assert max(float((single[k] - initial[k]).abs().max()) for k in initial) > 1e-2


def test_a_compiled_channels_last_network_with_fused_adam_stays_in_sync(tmp_path):
    """The speed options under DDP: the network compiled inside the DDP wrapper (aot_eager, as in
    test_training), its weights channels_last, Adam fused; the checkpoints keep the plain keys."""
    options = ("train.compile=true", "train.channels_last=true", "train.optimizer_kernel=fused", "train.ema_decay=0.9")
    single = train_one_and_two_processes(tmp_path, write_tiny_images(tmp_path), options, {"COMPILE_BACKEND": "aot_eager"})
    assert single and not [k for k in single if "_orig_mod" in k]
