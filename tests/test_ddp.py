"""Two CPU processes under torchrun (gloo) train in sync, and match one process on the same
global batch: every process draws the global batch and its noise, and takes its shard."""

import os
import subprocess
import sys
import textwrap

import torch

from thermodiff.run.checkpoint import load_checkpoint
from thermodiff.run.config import load_config
from thermodiff.run.experiment import assemble

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from thermodiff.run import distributed
    from thermodiff.run.config import load_config
    from thermodiff.run.training import train

    config, out = sys.argv[1], Path(sys.argv[2])
    if "RANK" in __import__("os").environ:
        # let every process write its own checkpoint, so the test can compare them
        rank = int(__import__("os").environ["RANK"])
        distributed.Context.is_main = property(lambda self: True)
        out = out / f"rank{rank}"
    train(load_config(config), out, progress=False, device="cpu")
""")


def run_worker(tmp_path, config, out, nproc: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(config), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(config), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run_dir / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "diffusion."))}


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
    run_worker(tmp_path, config, tmp_path / "single", nproc=1)
    run_worker(tmp_path, config, tmp_path / "ddp", nproc=2)
    single, rank0, rank1 = (weights(p) for p in (tmp_path / "single", tmp_path / "ddp/rank0", tmp_path / "ddp/rank1"))
    assert single.keys() == rank0.keys() == rank1.keys()
    assert any("logit_rest" in k for k in single)  # the learned schedule is synchronised too
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"{key}: processes out of sync")
        # the all-reduce sums gradients in another order: equal up to float rounding, amplified by 15 Adam steps
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=f"{key}: DDP != one process")
    # and training moved the weights well away from their shared initialisation
    initial = {f"model.{k}": v for k, v in assemble(load_config(str(config))).model.state_dict().items()}
    assert max(float((single[k] - initial[k]).abs().max()) for k in initial) > 1e-2
