"""benchmarks/throughput.py without timing anything: its arguments, the variant it combines from
the one-factor ones, and one tiny measurement of each mode with the training options on."""

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("throughput")


@pytest.mark.parametrize("argv, message", [
    (["--variants", "turbo"], "--variants"),
    (["--variants", "processes2", "--batch-size", "7"], "even"),
    (["--precisions", "fp16", "--device", "cpu"], "CUDA"),
    (["--presets", "resnet"], "--presets"),
])
def test_bad_arguments_are_refused(throughput, argv, message, capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(argv)
    assert message in capsys.readouterr().err


def test_combined_takes_the_fastest_of_each_group_that_beats_the_baseline(throughput):
    Variant = throughput.Variant
    baselines = [Variant("fp32"), Variant("bf16", precision="bf16")]
    rates = {"fp32": 100, "bf16": 150, "threads2": 130, "processes2": 180, "compile": 90, "channels_last": 120,
             "foreach": 101, "fused": 105}
    best = throughput.combined(baselines, {name: {"images_per_s": r} for name, r in rates.items()})
    assert best == Variant("combined", threads=1, processes=2, precision="bf16", compile=False, channels_last=True,
                           optimizer_kernel="fused")


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_one_tiny_measurement_with_the_options_on(throughput, mode):
    """The small network on batches of 4 at T = 10, channels_last and fused Adam (compiling is
    left to the benchmark: inductor takes minutes), one step timed: a full record."""
    variant = throughput.Variant("options", channels_last=True, optimizer_kernel="fused")
    threads = torch.get_num_threads()
    try:
        m = throughput.measure("small", mode, variant, "cpu", 4, 10, warmup=0, iters=1, repeats=1)
    finally:
        torch.set_num_threads(threads)  # measure sets its variant's
    assert m["images_per_s"] > 0 and m["variant"] == "options" and m["settings"]["channels_last"]
    assert ("data_share_pct" in m) == (mode == "train")
    flops = throughput.flops_per_image("small", 10)
    assert flops["train"] > 2 * flops["sample_step"] > 0  # the backward pass costs about twice the forward
    used = throughput.utilisation(m, flops, {"fp32": 1.0, "bf16": 2.0}, 10)
    assert used["utilisation_pct"] == pytest.approx(2 * used["utilisation_bf16_pct"])
    assert used["utilisation_peak_pct"] == used["utilisation_bf16_pct"]  # bf16 the faster here
    emulated = throughput.utilisation(m, flops, {"fp32": 1.0, "bf16": 0.1}, 10)
    assert emulated["utilisation_peak_pct"] == emulated["utilisation_pct"]  # fp32 the faster: the limit
