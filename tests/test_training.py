"""The training loop's weight average, its mixed precision, its time limit, its state's round
trip through a checkpoint and its metrics files."""

import copy
import functools
import json

import pytest
import torch
from conftest import assert_one_line_error
from torch import nn

from thermodiff.run.checkpoint import load_checkpoint, save_checkpoint
from thermodiff.run.config import TrainConfig, load_config
from thermodiff.run.experiment import assemble
from thermodiff.run.training import (EMA, METRIC_FIELDS, AutocastNetwork, TrainState, autocast, draw_batch,
                                     read_metrics, sampling_network, train_step)


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_warms_up_and_then_decays_at_its_rate(decay):
    """A weight that jumps from 0 to 1 at the first update: after n updates the average is
    1 - prod_k d_k with d_k = min(decay, (1 + k) / (10 + k)) (TensorFlow's num_updates rule),
    so a short run's average is not its initial weights; late updates decay at ``decay``."""
    layer = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(layer.weight)
    ema = EMA(layer, decay)
    nn.init.ones_(layer.weight)
    remaining = 1.0
    for step in range(1, 201):
        ema.update(layer, step)
        remaining *= min(decay, (1 + step) / (10 + step))
        assert float(ema.shadow["weight"]) == pytest.approx(1 - remaining, abs=1e-6)
    assert float(ema.shadow["weight"]) > 0.9  # without the warm-up, 0.999 leaves 1 - 0.999^200 = 0.18


def test_minutes_limits_training_and_extends_a_resumed_run(cli, tiny_config, tmp_path):
    """--minutes is a total of training time across resumes: a resumed run keeps its limit (and,
    out of time, stops at once) unless --minutes gives a new total, as --steps does for steps."""
    run = tmp_path / "run"
    first = cli("train", tiny_config, "--out", run, "--steps", 10**6, "--minutes", 0.001, "--quiet", "--json").json()
    assert 0 < first["steps"] < 10**6
    again = cli("train", tiny_config, "--out", run, "--resume", "--steps", 10**6, "--quiet", "--json").json()
    assert again["steps"] == first["steps"] + 1  # one step, then out of time (the limit holds)
    more = cli("train", tiny_config, "--out", run, "--resume", "--steps", again["steps"] + 30, "--minutes", 5,
               "--quiet", "--json").json()
    assert more["steps"] == again["steps"] + 30
    assert_one_line_error(cli("train", tiny_config, "--out", tmp_path / "r2", "--minutes", 0), "--minutes")


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float32)])
def test_autocast_lowers_the_network_on_cpu_only_for_bf16(precision, expected):
    """bf16 autocasts on the CPU too; fp16 (which needs CUDA's gradient scaler) leaves the CPU in fp32."""
    a = torch.randn(4, 4)
    with autocast(precision, torch.device("cpu")):
        assert (a @ a).dtype == expected
        assert torch.exp(a).dtype == torch.float32  # elementwise math keeps its precision


class _RecordingConv(nn.Module):
    """A convolution that records the dtype it ran in, of a network called as (x_t, t)."""

    def __init__(self):
        super().__init__()
        self.conv, self.dtypes, self.label = nn.Conv2d(2, 2, 3, padding=1), [], "tiny"

    def forward(self, x, t):
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out * t.view(-1, 1, 1, 1)


def test_autocast_network_lowers_the_network_alone():
    """fp32 is the network itself, bit for bit; bf16 runs its convolution in bf16 and hands back
    float32 close to fp32's; a float64 network's output stays float64; the wrapper copies (as the
    memory estimate copies networks) and passes other attributes through."""
    torch.manual_seed(0)
    net, x, t = _RecordingConv(), torch.randn(3, 2, 5, 5), torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(AutocastNetwork(net, "fp32")(x, t), net(x, t), rtol=0, atol=0)
    low = AutocastNetwork(net, "bf16")(x, t)
    assert net.dtypes[-1] == torch.bfloat16 and low.dtype == torch.float32
    assert not torch.equal(low, net(x, t))
    torch.testing.assert_close(low, net(x, t), rtol=0.05, atol=0.05)
    assert AutocastNetwork(net.double(), "fp32")(x.double(), t.double()).dtype == torch.float64
    assert copy.deepcopy(AutocastNetwork(net, "bf16")).label == "tiny"


@pytest.mark.parametrize("native", [True, False], ids=["cpu_with_bf16_units", "cpu_without"])
def test_a_network_samples_in_its_training_precision_where_it_is_native_unless_asked(native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)

    def precision(trained, asked=None):
        return sampling_network(nn.Linear(2, 2), TrainConfig(precision=trained), asked).precision

    assert precision("bf16") == ("bf16" if native else "fp32") and precision("fp32") == "fp32"
    assert precision("fp16") == "fp32"  # a GPU's; a CPU samples in fp32
    assert precision("bf16", "fp32") == "fp32" and precision("fp32", "bf16") == "bf16"


def _steps(state: TrainState, parts, t: TrainConfig, n: int) -> list[float]:
    return [train_step(state, draw_batch(state, parts.dataset, t.batch_size, torch.device("cpu")), t) for _ in range(n)]


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend: dynamo's graph capture and AOT autograd, as
    inductor has them, without its C++ compilation (minutes on a busy CPU;
    benchmarks/throughput.py --variants compile runs inductor itself)."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.mark.parametrize("config, options", [
    ("tiny_config", ["train.ema_decay=0.9", "train.grad_clip=0.5"]),
    ("tiny_images", ["train.ema_decay=0.9", "train.channels_last=true", "train.optimizer_kernel=fused",
                     "train.precision=bf16"]),
    ("tiny_images", ["model.network=unet", "train.compile=true", "train.channels_last=true",
                     "train.optimizer_kernel=foreach", "train.ema_decay=0.9"]),
], ids=["vectors", "images_channels_last_fused_bf16", "unet_compiled_channels_last_foreach"])
def test_a_train_state_continues_bit_for_bit_from_its_checkpoint(config, options, request, eager_compile, tmp_path):
    """to_checkpoint, written and read back, then from_checkpoint into freshly built parts: the
    next steps equal those of the state that never stopped (weights, average, optimiser, RNG),
    with the training options that change the network's layout, its compilation and the
    optimiser's kernel too; the checkpoint holds the plain network's keys."""
    cfg = load_config(str(request.getfixturevalue(config)), options)
    parts = assemble(cfg)
    state = TrainState.start(parts.model, parts.diffusion, cfg.train, cfg.seed)
    _steps(state, parts, cfg.train, 3)
    tensors, meta = state.to_checkpoint()
    save_checkpoint(tmp_path / "state.safetensors", tensors, meta)
    tensors, meta = load_checkpoint(tmp_path / "state.safetensors")
    again_parts = assemble(cfg)
    again = TrainState.from_checkpoint(again_parts.model, again_parts.diffusion, cfg.train, cfg.seed, tensors, meta)
    assert (again.step, again.window) == (state.step, state.window) and again.elapsed_s >= meta["elapsed_s"]
    assert _steps(again, again_parts, cfg.train, 4) == _steps(state, parts, cfg.train, 4)
    ours, theirs = state.to_checkpoint()[0], again.to_checkpoint()[0]
    assert ours.keys() == theirs.keys() and any(k.startswith("ema.") for k in ours)
    # the plain network's keys, not a compiled wrapper's "_orig_mod."
    assert {k for k in ours if k.startswith("model.")} == {f"model.{k}" for k in assemble(cfg).model.state_dict()}
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_old_metrics_with_loss_bits_resume_as_K_bits_window(tiny_config, cli, tmp_path):
    """Older versions logged minus the window's mean K as loss_bits, which is not the optimised
    loss; a run of theirs resumes with that column as K_bits_window, sign and all."""
    run = tmp_path / "run"
    assert cli("train", tiny_config, "--out", run, "--steps", 10, "--quiet").rc == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    old = [{("loss_bits" if k == "K_bits_window" else k): (-v if k == "K_bits_window" else v) for k, v in r.items()}
           for r in records]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert read_metrics(run) == records
    assert cli("train", tiny_config, "--out", run, "--resume", "--steps", 20, "--quiet").rc == 0
    resumed = read_metrics(run)
    assert resumed[: len(records)] == records and [r["step"] for r in resumed] == [5, 10, 15, 20]
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert header.split(",") == METRIC_FIELDS and len(rows) == 4
    assert [float(row.split(",")[2]) for row in rows] == [r["K_bits_window"] for r in resumed]


def test_a_compiled_channels_last_fused_unet_run_validates_resumes_and_evaluates(cli, tiny_images, eager_compile, tmp_path):
    """Through the CLI, with the validation split scored (an uncompiled copy of the network) and
    a weight average: both checkpoints hold the plain network's keys, and the run resumes and
    evaluates; RMSprop, which torch gives no fused step, is a one-line error."""
    run = tmp_path / "run"
    options = ["--set", "model.network=unet", "--set", "train.compile=true", "--set", "train.channels_last=true",
               "--set", "train.optimizer_kernel=fused", "--set", "train.ema_decay=0.9", "--set", "data.val_fraction=0.25"]
    first = cli("train", tiny_images, "--out", run, *options, "--quiet", "--json").json()
    again = cli("train", tiny_images, "--out", run, "--resume", "--steps", 6, "--quiet", "--json").json()
    assert (first["steps"], again["steps"]) == (4, 6) and again["best"]["step"] in (4, 6)
    for name in ("checkpoint.safetensors", "best.safetensors"):
        assert not [k for k in load_checkpoint(run / name)[0] if "_orig_mod" in k], name
    assert cli("evaluate", run, "--quiet", "--json").json()["n_examples"] == 12
    assert_one_line_error(cli("train", tiny_images, "--out", tmp_path / "r2", "--set", "train.optimizer=rmsprop",
                              "--set", "train.optimizer_kernel=fused", "--quiet"), "optimizer_kernel", "rmsprop")
