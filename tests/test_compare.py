"""``thermodiff compare``: two tiny configs on one data set give one table, compare.json with
every run's held-out bound on the same examples, and the plot of the bound against training time;
a time budget stops training; configs on different data are refused with a one-line error."""

import json

from conftest import TINY_TOML, assert_one_line_error, write_tiny_config
from test_vdm import VDM_TOML

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_configs(tmp_path, second: str = VDM_TOML):
    first = write_tiny_config(tmp_path, TINY_TOML.replace('name = "tiny"', 'name = "paper2015"'))
    other = tmp_path / "second.toml"
    other.write_text(second.replace('name = "tiny"', 'name = "second"'), encoding="utf-8")
    return first, other


def test_compare_two_configs_table_json_and_plot(cli, tmp_path):
    first, second = two_configs(tmp_path)
    out = tmp_path / "cmp"
    r = cli("compare", first, second, "--steps", 10, "--samples", 20, "--out", out, "--quiet")
    assert r.rc == 0, r
    assert "paper2015" in r.out and "second" in r.out and "continuous time" in r.out and "bits/dim" in r.out
    record = json.loads((out / "compare.json").read_text())
    rows = {row["name"]: row for row in record["rows"]}
    assert rows["paper2015"]["model"] == "reference, bound" and rows["second"]["model"] == "vdm"
    for row in rows.values():
        e = row["evaluation"]
        assert row["steps"] == 10 and row["train_s"] > 0 and row["sample_s_per_example"] > 0 and row["curve"]
        assert e["n_examples"] == 40 and "K_bits" in e and "stderr_bits" in e
    assert rows["paper2015"]["evaluation"]["L_null_bits"] == rows["second"]["evaluation"]["L_null_bits"]  # same examples
    assert (out / "bound_vs_time.png").read_bytes()[:8] == PNG_MAGIC
    again = cli("compare", first, second, "--steps", 10, "--out", out, "--quiet", "--json")
    assert_one_line_error(again, "already exist", "--overwrite")
    assert cli("compare", first, second, "--steps", 10, "--out", out, "--quiet", "--json", "--overwrite").json()["rows"]


def test_compare_with_a_time_budget_stops_training(cli, tmp_path):
    first, second = two_configs(tmp_path, TINY_TOML + '\n[baseline]\nkind = "dae"\n')
    r = cli("compare", first, second, "--minutes", 0.002, "--out", tmp_path / "cmp", "--quiet", "--json")
    assert r.rc == 0, r
    rows = r.json()["rows"]
    for row in rows:  # stopped by time, after 0.12 s of training (the step that crossed it ends the run)
        assert 0 < row["steps"] < 10**9 and 0.119 <= row["train_s"] < 5, row
    assert rows[1]["model"] == "dae" and rows[1]["sample_s_per_example"] is None
    assert "output_mse" in rows[1]["evaluation"]


def test_compare_refuses_different_data(cli, tmp_path):
    first, second = two_configs(tmp_path, VDM_TOML.replace("n = 400", "n = 500"))
    assert_one_line_error(cli("compare", first, second, "--steps", 5, "--out", tmp_path / "c"), "one data set")
    assert_one_line_error(cli("compare", first, first, "--steps", 5, "--out", tmp_path / "c"), "share a name")
    assert_one_line_error(cli("compare", first, "--minutes", 0, "--out", tmp_path / "c"), "--minutes")
