"""benchmarks/paired.py's catch-up extrapolation (the run's paired difference by budget, read from
the earlier records of the same run, and the time at which the log-linear line through the last
two budgets reaches 0) and its late rise (how much a run's training estimate still rose at the end)."""

import json
import math

import torch

from conftest import load_benchmark


def row(run: str, minutes: float, difference: float) -> dict:
    return {"run": run, "clock": "cpu", "train_cpu_s": 60 * minutes,
            "vs_first": {"K_difference_bits_per_pixel": difference, "stderr_bits_per_pixel": 0.01, "images": 200}}


def extrapolate(tmp_path, monkeypatch, earlier: list[tuple[float, float]], now: tuple[float, float],
                first_minutes: list[float] | None = None) -> dict:
    """by_budget for runs/a at ``now`` (minutes, difference) after ``earlier`` records of it; the
    first run trained for ``first_minutes`` in each record, the last for ``now`` (60 throughout by default)."""
    paired = load_benchmark("paired")
    monkeypatch.setattr(paired, "RESULTS", tmp_path)
    first_minutes = first_minutes or [60.0] * (len(earlier) + 1)
    names = []
    for i, ((minutes, difference), first) in enumerate(zip(earlier, first_minutes)):
        names.append(f"earlier{i}")
        rows = [row("runs/first", first, 0.0), row("runs/a", minutes, difference), row("runs/b", minutes, 5.0)]
        (tmp_path / f"{names[-1]}.json").write_text(json.dumps({"rows": rows}))
    return paired.by_budget(row("runs/a", *now), row("runs/first", first_minutes[-1], 0.0), names)


def test_the_line_through_the_last_two_budgets_reaches_zero_at_the_extrapolated_time(tmp_path, monkeypatch):
    out = extrapolate(tmp_path, monkeypatch, [(30, -2.5), (60, -1.6)], (120, -1.0))
    assert [p["minutes"] for p in out["by_minutes"]] == [30, 60, 120]
    assert [p["K_difference_bits_per_pixel"] for p in out["by_minutes"]] == [-2.5, -1.6, -1.0]
    e = out["extrapolation"]
    assert e["label"] == "extrapolation, not a measurement"
    line = lambda m: -1.0 + e["rise_per_doubling_bits_per_pixel"] * math.log2(m / 120)  # noqa: E731
    assert math.isclose(line(60), -1.6) and abs(line(e["minutes_to_reach_first"])) < 1e-12


def test_no_catch_up_time_for_a_run_ahead_or_falling_behind(tmp_path, monkeypatch):
    assert extrapolate(tmp_path, monkeypatch, [(60, -0.2)], (120, 0.3))["extrapolation"]["minutes_to_reach_first"] is None
    assert extrapolate(tmp_path, monkeypatch, [(60, -0.5)], (120, -0.9))["extrapolation"]["minutes_to_reach_first"] is None
    assert "extrapolation" not in extrapolate(tmp_path, monkeypatch, [], (120, -0.9))


def test_no_extrapolation_across_budgets_of_the_first_run(tmp_path, monkeypatch):
    """A gap to a first run trained longer in the latest record is not on the same line as the earlier gaps."""
    out = extrapolate(tmp_path, monkeypatch, [(60, -1.6), (120, -1.0)], (240, -0.8), first_minutes=[60, 60, 120])
    assert [p["first_minutes"] for p in out["by_minutes"]] == [60, 60, 120]
    assert "extrapolation" not in out


def windows(k_at, minutes: float = 60, every_s: float = 30) -> list[dict]:
    """A log of training windows every ``every_s`` seconds whose K (bits per image) is ``k_at(t)``."""
    times = [every_s * (i + 1) for i in range(int(60 * minutes / every_s))]
    return [{"step": i, "elapsed_s": t, "K_bits_window": k_at(t)} for i, t in enumerate(times)]


def test_late_rise_measures_a_linear_climb_between_the_last_two_quarters():
    paired = load_benchmark("paired")
    pixels, per_s = 1024, 0.5  # K rises 0.5 bits per image per second
    out = paired.late_rise(windows(lambda t: per_s * t), pixels)
    # Quarter means of a line sit at the quarters' midpoints, a quarter of the run (900 s) apart.
    assert math.isclose(out["rise_bits_per_pixel"], per_s * 900 / pixels, rel_tol=1e-9)
    assert out["windows"] == [30, 30] and out["minutes"] == 60


def test_late_rise_of_a_level_run_is_zero_within_its_standard_error():
    paired = load_benchmark("paired")
    noise = torch.Generator().manual_seed(0)
    draws = iter(torch.randn(120, generator=noise, dtype=torch.float64).tolist())
    out = paired.late_rise(windows(lambda t: 3000 + 40 * next(draws)), 1024)
    assert abs(out["rise_bits_per_pixel"]) < 3 * out["stderr_bits_per_pixel"]
    expected = 40 / 1024 * math.sqrt(2 / 30)  # two means of 30 windows with sd 40 bits per image
    assert 0.5 * expected < out["stderr_bits_per_pixel"] < 2 * expected


def test_late_rise_needs_two_windows_in_each_quarter():
    assert load_benchmark("paired").late_rise(windows(lambda t: 1.0, minutes=2), 1024) == {}


def scored(run: str, minutes: float, k: float, difference: float) -> dict:
    """A record row of ``run`` with its test K, its curve and its paired difference from the first run."""
    return {**row(run, minutes, difference), "evaluation": {"K_bits_per_pixel": k, "stderr_bits_per_pixel": 0.02},
            "curve": [{"step": s, "elapsed_s": 6 * s * minutes, "K_bits_per_pixel_running": k * s / 10} for s in range(1, 11)]}


def test_held_out_k_by_budget_reads_the_run_in_earlier_records_once_per_budget(tmp_path, monkeypatch):
    paired = load_benchmark("paired")
    monkeypatch.setattr(paired, "RESULTS", tmp_path)
    for name, (first, a) in {"r1": ((60, 3.0), (120, 2.0)), "r2": ((60.0004, 3.0), (240, 2.5))}.items():
        rows = [scored("runs/first", *first, 0.0), scored("runs/a", *a, a[1] - first[1])]
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows}))
    assert paired.held_out_k_by_budget(scored("runs/a", 360, 2.8, -0.5), ["r2", "r1"]) == \
        [(120, 2.0, 0.02), (240, 2.5, 0.02), (360, 2.8, 0.02)]
    # The first run appears at 60 minutes in both records (by the log in one, the checkpoint in the other): one point.
    assert paired.held_out_k_by_budget(scored("runs/first", 90, 3.2, 0.0), ["r1", "r2"]) == \
        [(60, 3.0, 0.02), (90, 3.2, 0.02)]


def test_the_curves_figure_has_a_gap_panel_only_with_budgets(tmp_path, monkeypatch):
    from PIL import Image

    paired = load_benchmark("paired")
    monkeypatch.setattr(paired, "RESULTS", tmp_path)
    first, later = scored("runs/first", 60, 3.0, 0.0), scored("runs/a", 120, 2.0, -1.0)
    (tmp_path / "r1.json").write_text(json.dumps({"rows": [first, scored("runs/a", 60, 1.0, -2.0)]}))
    widths = {}
    for budgets in (False, True):
        if budgets:
            later["by_budget"] = paired.by_budget(later, first, ["r1"])
        path = paired.curves_figure([first, later], ["r1"] if budgets else [], tmp_path / f"{budgets}.png")
        widths[budgets] = Image.open(path).size[0]
    assert widths[True] == 2 * widths[False]
