"""Config files: the packaged experiments, strict keys and types, --set overrides, lookup by
name, and errors that name the file and the key."""

import typing
from pathlib import Path

import pytest

from thermodiff.errors import UserError
from thermodiff.nets.vector import ACTIVATIONS, Readout
from thermodiff.process import vdm
from thermodiff.process.binomial import BinomialParameterization
from thermodiff.process.categorical import CategoricalKernel, CategoricalParameterization
from thermodiff.process.bound import TrainingLoss
from thermodiff.process.gaussian import Decoder, FixedVariance, GaussianParameterization
from thermodiff.process.schedules import ScheduleKind
from thermodiff.run import config
from thermodiff.run.config import CONFIG_DIR, Config, find_config, load_config, parse_override
from thermodiff.run.experiment import IMAGE_NETWORKS

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_swissroll_config():
    cfg = load_config("swissroll")
    assert cfg.name == "swissroll"
    assert (cfg.data.source, cfg.data.n, cfg.data.noise, cfg.data.val_fraction) == ("swissroll", 20000, 0.0, 0.1)
    assert (cfg.diffusion.kind, cfg.diffusion.T, cfg.diffusion.beta_1) == ("gaussian", "auto", "auto")
    assert (cfg.model.network, cfg.model.hidden) == ("auto", "auto")
    assert (cfg.train.steps, cfg.train.max_minutes, cfg.train.lr_schedule) == (0, 3.0, "cosine")
    assert cfg.eval.n_draws == 1


def test_swissroll_paper_config():
    cfg = load_config("swissroll_paper")
    assert (cfg.diffusion.T, cfg.diffusion.schedule, cfg.diffusion.beta_1, cfg.diffusion.parameterization) == (
        40, "learned", 1e-6, "reference")
    assert (cfg.model.network, cfg.model.hidden, cfg.model.readout) == ("rbf", 16, "per_step")
    assert cfg.train.lr == 3e-3 and type(cfg.train.lr) is float
    assert type(cfg.train.steps) is int and cfg.train.steps == 60000


def test_heartbeat_config():
    cfg = load_config("heartbeat")
    assert cfg.name == "heartbeat"
    assert (cfg.data.source, cfg.data.n, cfg.data.val_fraction) == ("heartbeat", 10000, 0.1)
    assert (cfg.diffusion.kind, cfg.diffusion.T, cfg.diffusion.parameterization) == ("binomial", "auto", "auto")
    assert (cfg.train.steps, cfg.train.max_minutes) == (0, 5.0)
    paper = load_config("heartbeat_paper")
    assert (paper.model.hidden, paper.model.activation, paper.diffusion.decoder) == (50, "sigmoid", "forward")
    assert (paper.diffusion.T, paper.diffusion.parameterization) == (2000, "forward_offset")


@pytest.mark.skipif(not REPO_CONFIGS.is_dir(), reason="no configs/ folder next to tests/")
@pytest.mark.parametrize("name", ["swissroll", "heartbeat"])
def test_repository_configs_match_the_packaged_ones(name):
    """configs/NAME.toml (what the README points at) and the copy inside the package (what
    `thermodiff train NAME` reads) must not drift apart."""
    assert (REPO_CONFIGS / f"{name}.toml").read_text() == (CONFIG_DIR / f"{name}.toml").read_text()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.toml")), ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_packaged_config_loads(path):
    assert load_config(str(path)).name


def test_config_by_path_defaults_and_name(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 7\n", name="my_exp.toml")
    cfg = load_config(str(path))
    assert cfg.name == "my_exp"  # the file's stem when the file sets none
    assert cfg.train.steps == 7
    default = Config()
    assert cfg.diffusion == default.diffusion and cfg.data == default.data and cfg.train.lr == default.train.lr
    named = load_config(str(write(tmp_path, 'name = "other"\n', name="x.toml")))
    assert named.name == "other"


def test_to_dict_from_dict_round_trip():
    cfg = load_config("heartbeat", ["seed=5", "diffusion.stationary_p=0.3"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(cfg.to_dict()).diffusion.stationary_p == 0.3


@pytest.mark.parametrize("text, key", [
    ("bogus = 1\n", "'bogus'"),
    ("[train]\nstepz = 3\n", "'train.stepz'"),
    ("[trian]\nsteps = 3\n", "'trian'"),
    ("[data]\nsource = 'swissroll'\n[data.extra]\nx = 1\n", "'data.extra'"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(str(path))
    message = str(e.value)
    assert key in message and str(path) in message and "unknown key" in message


@pytest.mark.parametrize("text, key", [
    ('[diffusion]\nT = "10"\n', "diffusion.T"),  # string for int
    ("[diffusion]\nT = true\n", "diffusion.T"),  # bool for int
    ("[diffusion]\nT = 1.5\n", "diffusion.T"),  # float for int
    ("[diffusion]\nT = 10.0\n", "diffusion.T"),  # even an integral float
    ('[train]\nlr = "fast"\n', "train.lr"),
    ("[train]\nlr = true\n", "train.lr"),
    ("[data]\nsource = 3\n", "data.source"),
    ("[diffusion]\nbeta_1 = 'small'\n", "diffusion.beta_1"),
    ("seed = 1.0\n", "seed"),
    ("name = 5\n", "name"),
    ("[eval]\nn_draws = [1, 2]\n", "eval.n_draws"),
    ("data = 5\n", "data"),
])
def test_ill_typed_values_are_refused(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert key in str(e.value) and str(path) in str(e.value)


def values(enum) -> set[str]:
    return {member.value for member in enum}


@pytest.mark.parametrize("options, library", [
    (config.ScheduleName, values(ScheduleKind)),
    (config.ParameterizationName, values(GaussianParameterization) | values(BinomialParameterization)
     | values(CategoricalParameterization) | values(vdm.Parameterization)),
    (config.VarianceName, values(FixedVariance)),
    (config.DecoderName, values(Decoder)),
    (config.ScheduleGradientName, values(vdm.ScheduleGradient)),
    (config.CategoricalKernelName, values(CategoricalKernel) - {"marginal"}),  # marginal: the library's only
    (config.ActivationName, set(ACTIVATIONS)),
    (config.ReadoutName, values(Readout)),
    (config.LossName, values(TrainingLoss)),
], ids=["schedule", "parameterization", "eps_variance", "decoder", "schedule_gradient", "kernel", "activation", "readout",
        "loss"])
def test_option_sets_are_the_librarys(options, library):
    """Each config option with a fixed set of values lists exactly what the library builds."""
    assert set(typing.get_args(options)) == library


def test_image_networks_are_network_names():
    assert set(IMAGE_NETWORKS) <= set(typing.get_args(config.NetworkName))


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp8", "train.precision: expected 'fp32' or 'bf16' or 'fp16' or 'auto', got 'fp8'"),
    ("diffusion.kind=vae", "diffusion.kind: expected 'gaussian' or 'binomial' or 'categorical' or 'vdm' or 'auto', got 'vae'"),
    ("diffusion.eps_variance=small", "diffusion.eps_variance: expected 'beta_tilde' or 'beta' or none, got 'small'"),
    ("baseline.kind=gan", "baseline.kind: expected '' or 'vae' or 'dae' or 'mcgsm', got 'gan'"),
    ("model.activation=gelu", "model.activation: expected 'sigmoid' or 'tanh' or 'relu'"),
    ("train.optimizer_kernel=fast", "train.optimizer_kernel: expected 'default' or 'foreach' or 'fused', got 'fast'"),
    ("train.compile=yes", "train.compile: expected bool or 'auto', got 'yes'"),
    ("train.channels_last=1", "train.channels_last: expected bool or 'auto', got 1"),
])
def test_a_value_outside_its_set_is_refused_at_load_naming_key_and_values(override, message):
    with pytest.raises(UserError) as e:
        load_config("swissroll", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("section, key, value", [("train", "optimizer", "sgd"), ("train", "lr_schedule", "linear"),
                                                 ("train", "t_sampler", "random"), ("data", "scaling", "minmax"),
                                                 ("model", "readout", None), ("train", "optimizer_kernel", "fast")])
def test_validate_checks_the_sets_of_a_config_built_in_code(section, key, value):
    cfg = Config()
    cfg.validate()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(UserError, match=f"{section}.{key}: expected .*, got {value!r}"):
        cfg.validate()


def test_int_is_accepted_where_float_is_expected(tmp_path):
    cfg = load_config(str(write(tmp_path, "[train]\nlr = 1\n[data]\nnoise = 0\n")))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.data.noise) is float


def test_set_overrides():
    cfg = load_config("swissroll", [
        "train.steps=7",  # TOML int
        "train.lr=5e-4",  # TOML float
        "diffusion.schedule=linear",  # bare word: a string
        'data.source="my data.csv"',  # quoted TOML string
        "model.activation = relu",  # spaces around '='
        "seed=3",  # top level
        "diffusion.beta_1=none",  # None, which TOML cannot write
        "data.noise=0",  # int where a float is expected
    ])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.train.lr == 5e-4
    assert cfg.diffusion.schedule == "linear"
    assert cfg.data.source == "my data.csv"
    assert cfg.model.activation == "relu"
    assert cfg.seed == 3
    assert cfg.diffusion.beta_1 is None
    assert cfg.data.noise == 0.0 and type(cfg.data.noise) is float
    # untouched keys keep the file's values
    assert cfg.diffusion.T == "auto" and cfg.data.n == 20000


def test_later_set_wins():
    assert load_config("swissroll", ["train.steps=7", "train.steps=9"]).train.steps == 9


def test_parse_override():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    assert parse_override('k="1"') == (["k"], "1")
    assert parse_override("k=[1, 2]") == (["k"], [1, 2])
    assert parse_override("k=null") == (["k"], None)


@pytest.mark.parametrize("override, needle", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("train.nope=1", "'train.nope'"),
    ("nope=1", "'nope'"),
    ("seed.x=1", "'seed'"),
    ("train", "section.key=value"),
    ("data=5", "[data]"),
    ("train.lr=none", "train.lr"),  # lr is not optional
])
def test_bad_set_overrides(override, needle):
    with pytest.raises(UserError) as e:
        load_config("swissroll", [override])
    assert needle in str(e.value)


def test_find_config_unknown_name_lists_known_ones():
    with pytest.raises(UserError) as e:
        find_config("swissrol")
    message = str(e.value)
    assert "'swissrol'" in message and "heartbeat" in message and "swissroll" in message


def test_find_config_missing_toml_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(UserError) as e:
        find_config(str(path))
    assert str(path) in str(e.value)


def test_find_config_folder_named_like_an_experiment_does_not_shadow_it(tmp_path, monkeypatch):
    """E.g. after `thermodiff train swissroll --out swissroll`, `thermodiff train swissroll`
    must still find the packaged experiment."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "swissroll").mkdir()
    assert find_config("swissroll") == CONFIG_DIR / "swissroll.toml"
    assert load_config("swissroll").name == "swissroll"


def test_find_config_path_without_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myexp").write_text("[train]\nsteps = 3\n")
    assert load_config("myexp").train.steps == 3


@pytest.mark.parametrize("text", ["[train\nsteps = 3\n", "steps = = 3\n", "[train]\nsteps = 3\nsteps = 4\n"])
def test_invalid_toml_names_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(path) in str(e.value) and "TOML" in str(e.value)


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(path) in str(e.value)
