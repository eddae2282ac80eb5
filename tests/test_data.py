"""Data: the toy sets, user arrays (.npy / .npz / .csv), the scaling and the split; and that
every kind of bad input file is a UserError whose one-line message names the file."""

import math
import os
import pickle
import zipfile

import numpy as np
import pytest

from thermodiff.data.dataset import Scaling, heartbeat, is_binary, load_array, split, swiss_roll, validate_array
from thermodiff.errors import UserError

# --------------------------------------------------------------------------- toy sets


def test_swiss_roll_shape_dtype_and_determinism():
    x = swiss_roll(500, seed=3)
    assert x.shape == (500, 2) and x.dtype == np.float64
    np.testing.assert_array_equal(x, swiss_roll(500, seed=3))
    assert not np.allclose(x, swiss_roll(500, seed=4))


def test_swiss_roll_points_lie_on_the_spiral():
    """Noise-free points are a (cos a, sin a) with a = |x| in [1.5 pi, 4.5 pi]."""
    x = swiss_roll(2000, seed=1)
    radius = np.hypot(x[:, 0], x[:, 1])
    assert radius.min() >= 1.5 * np.pi - 1e-9 and radius.max() <= 4.5 * np.pi + 1e-9
    np.testing.assert_allclose(x[:, 0], radius * np.cos(radius), atol=1e-9)
    np.testing.assert_allclose(x[:, 1], radius * np.sin(radius), atol=1e-9)
    # the angle is uniform on [1.5 pi, 4.5 pi]: mean 3 pi, sd 3 pi / sqrt(3)
    assert abs(radius.mean() - 3 * np.pi) < 4 * (np.pi * 3**0.5 / np.sqrt(2000))


def test_swiss_roll_noise_is_gaussian_with_the_given_std():
    clean = swiss_roll(20000, noise=0.0, seed=7)
    noisy = swiss_roll(20000, noise=0.3, seed=7)
    diff = noisy - clean  # same angles (the noise is drawn after them)
    assert abs(diff.mean()) < 0.01
    np.testing.assert_allclose(diff.std(0), [0.3, 0.3], rtol=0.03)
    assert abs(np.corrcoef(diff.T)[0, 1]) < 0.03


@pytest.mark.parametrize("noise", [-0.1, float("nan"), float("inf")])
def test_swiss_roll_refuses_bad_noise(noise):
    with pytest.raises(UserError, match="noise"):
        swiss_roll(10, noise=noise)


@pytest.mark.parametrize("make", [swiss_roll, heartbeat])
@pytest.mark.parametrize("n", [-5, 0, 1])
def test_toy_sets_refuse_too_few_examples(make, n):
    with pytest.raises(UserError, match="data.n"):
        make(n)


def test_heartbeat_structure():
    x = heartbeat(1000, seed=1)
    assert x.shape == (1000, 20) and x.dtype == np.float64
    assert is_binary(x)
    phases = []
    for row in x:
        ones = np.flatnonzero(row)
        phase = ones[0]
        assert phase < 5
        np.testing.assert_array_equal(ones, np.arange(phase, 20, 5))  # exactly one phase, period 5
        phases.append(phase)
    counts = np.bincount(phases, minlength=5)
    assert (counts > 0).all()  # all 5 phases occur
    assert np.all(np.abs(counts / 1000 - 0.2) < 0.05)  # uniformly
    np.testing.assert_array_equal(x, heartbeat(1000, seed=1))
    assert not np.array_equal(x, heartbeat(1000, seed=2))


def test_heartbeat_other_length_and_period():
    x = heartbeat(50, length=12, period=3, seed=0)
    assert x.shape == (50, 12)
    assert np.all(x.sum(1) == 4)


# --------------------------------------------------------------------------- user arrays


def test_load_npy_any_numeric_dtype(tmp_path):
    for dtype in (np.float32, np.float64, np.int64, np.uint8, bool):
        a = (np.arange(12).reshape(6, 2) % 2).astype(dtype)
        np.save(tmp_path / "a.npy", a)
        x = load_array(tmp_path / "a.npy")
        assert x.dtype == np.float64 and x.shape == (6, 2)
        np.testing.assert_array_equal(x, a.astype(np.float64))


def test_load_npy_suffix_case_insensitive(tmp_path):
    a = np.random.default_rng(0).normal(size=(5, 3))
    with open(tmp_path / "A.NPY", "wb") as f:
        np.save(f, a)
    np.testing.assert_array_equal(load_array(tmp_path / "A.NPY"), a)


def test_load_npz_single_array_and_key(tmp_path):
    a, b = np.ones((4, 2)), np.arange(15.0).reshape(5, 3)
    np.savez(tmp_path / "one.npz", only=a)
    np.testing.assert_array_equal(load_array(tmp_path / "one.npz"), a)
    np.savez_compressed(tmp_path / "two.npz", a=a, b=b)
    np.testing.assert_array_equal(load_array(tmp_path / "two.npz", key="b"), b)
    np.testing.assert_array_equal(load_array(tmp_path / "two.npz", key="a"), a)


def test_load_npz_several_arrays_need_a_key(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, a=np.ones((4, 2)), b=np.ones((4, 2)))
    with pytest.raises(UserError) as e:
        load_array(path)
    assert str(path) in str(e.value) and "'a'" in str(e.value) and "'b'" in str(e.value) and "key" in str(e.value)
    with pytest.raises(UserError) as e:
        load_array(path, key="c")
    assert str(path) in str(e.value) and "'c'" in str(e.value)


def test_load_csv_without_header(tmp_path):
    a = np.random.default_rng(1).normal(size=(7, 3)) * 100
    np.savetxt(tmp_path / "a.csv", a, delimiter=",", fmt="%.17g")
    np.testing.assert_array_equal(load_array(tmp_path / "a.csv"), a)


def test_load_csv_with_header(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("x,y\n1,2\n3.5,-4\n5e-3,6\n")
    np.testing.assert_array_equal(load_array(path), [[1, 2], [3.5, -4], [5e-3, 6]])


def test_load_csv_single_column_and_byte_order_mark(tmp_path):
    path = tmp_path / "col.csv"
    path.write_text("1\n2\n3\n")
    np.testing.assert_array_equal(load_array(path), [[1], [2], [3]])
    bom = tmp_path / "bom.csv"  # as Excel writes it: the mark must not make row 1 look like a header
    bom.write_text("1,2\n3,4\n5,6\n", encoding="utf-8-sig")
    np.testing.assert_array_equal(load_array(bom), [[1, 2], [3, 4], [5, 6]])
    bom_header = tmp_path / "bom_header.csv"
    bom_header.write_text("a,b\n3,4\n5,6\n", encoding="utf-8-sig")
    np.testing.assert_array_equal(load_array(bom_header), [[3, 4], [5, 6]])


def test_is_binary():
    assert is_binary(np.array([[0.0, 1.0], [1.0, 1.0]]))
    assert not is_binary(np.array([[0.0, 1.0], [0.5, 1.0]]))
    assert not is_binary(np.array([[0.0, 2.0], [1.0, 1.0]]))


# --------------------------------------------------------------------------- bad input


class _Boom:
    """Unpickling this creates a directory (``marker``): evidence that code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_bad(kind: str, tmp_path) -> "tuple[os.PathLike, str]":
    """Make a bad input file of this kind; returns (path, a word the message must contain)."""
    good = np.random.default_rng(0).normal(size=(10, 2))
    if kind == "missing":
        return tmp_path / "missing.npy", "no such file"
    if kind == "empty":
        (tmp_path / "empty.npy").write_bytes(b"")
        return tmp_path / "empty.npy", "empty"
    if kind == "directory":
        (tmp_path / "folder.npy").mkdir()
        return tmp_path / "folder.npy", "directory"
    if kind == "unknown_extension":
        (tmp_path / "data.txt").write_text("1,2\n3,4\n")
        return tmp_path / "data.txt", ".txt"
    if kind == "no_extension":
        (tmp_path / "data").write_text("1,2\n3,4\n")
        return tmp_path / "data", "format"
    if kind == "1d":
        np.save(tmp_path / "v.npy", np.arange(5.0))
        return tmp_path / "v.npy", "(5,)"
    if kind == "3d":
        np.save(tmp_path / "c.npy", np.zeros((4, 3, 2)))
        return tmp_path / "c.npy", "(4, 3, 2)"
    if kind == "0d":
        np.save(tmp_path / "s.npy", np.float64(3.0))
        return tmp_path / "s.npy", "shape"
    if kind == "one_row":
        np.save(tmp_path / "r.npy", np.zeros((1, 3)))
        return tmp_path / "r.npy", "2 rows"
    if kind == "nan":
        bad = good.copy()
        bad[3, 1] = np.nan
        np.save(tmp_path / "nan.npy", bad)
        return tmp_path / "nan.npy", "NaN"
    if kind == "inf":
        bad = good.copy()
        bad[[2, 5], 0] = [np.inf, -np.inf]
        np.savez(tmp_path / "inf.npz", x=bad)
        return tmp_path / "inf.npz", "infinite"
    if kind == "nan_csv":
        (tmp_path / "nan.csv").write_text("1,2\nnan,4\n5,6\n")
        return tmp_path / "nan.csv", "NaN"
    if kind == "strings":
        np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
        return tmp_path / "s.npy", "numeric"
    if kind == "complex":
        np.save(tmp_path / "z.npy", good + 1j)
        return tmp_path / "z.npy", "numeric"
    if kind == "object_npy":
        np.save(tmp_path / "o.npy", np.array([[1, "x"], [2, None]], dtype=object), allow_pickle=True)
        return tmp_path / "o.npy", "pickle"
    if kind == "object_npz":
        np.savez(tmp_path / "o.npz", x=np.array([[1, 2], [3, None]], dtype=object))
        return tmp_path / "o.npz", "pickle"
    if kind == "truncated_npy":
        np.save(tmp_path / "t.npy", good)
        data = (tmp_path / "t.npy").read_bytes()
        (tmp_path / "t.npy").write_bytes(data[: len(data) - 20])
        return tmp_path / "t.npy", "npy"
    if kind == "header_only_npy":
        np.save(tmp_path / "t.npy", good)
        (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:40])
        return tmp_path / "t.npy", "npy"
    if kind == "corrupt_npz":
        (tmp_path / "c.npz").write_bytes(np.random.default_rng(1).bytes(300))
        return tmp_path / "c.npz", "npz"
    if kind == "truncated_npz":
        np.savez(tmp_path / "t.npz", x=good)
        data = (tmp_path / "t.npz").read_bytes()
        (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
        return tmp_path / "t.npz", "npz"
    if kind == "npz_member_not_npy":
        with zipfile.ZipFile(tmp_path / "m.npz", "w") as z:
            z.writestr("x.npy", b"this is not an npy file at all")
        return tmp_path / "m.npz", "npz"
    if kind == "npz_empty_archive":
        np.savez(tmp_path / "e.npz")
        return tmp_path / "e.npz", "key"
    if kind == "npz_saved_as_npy":
        np.savez(tmp_path / "real.npz", x=good)
        os.replace(tmp_path / "real.npz", tmp_path / "looks.npy")
        return tmp_path / "looks.npy", ".npz"
    if kind == "npy_saved_as_npz":
        np.save(tmp_path / "real.npy", good)
        os.replace(tmp_path / "real.npy", tmp_path / "looks.npz")
        return tmp_path / "looks.npz", ".npy"
    if kind == "csv_text_in_body":
        (tmp_path / "t.csv").write_text("x,y\n1,2\n3,oops\n5,6\n")
        return tmp_path / "t.csv", "oops"
    if kind == "csv_ragged":
        (tmp_path / "r.csv").write_text("1,2\n3,4,5\n6,7\n")
        return tmp_path / "r.csv", "csv"
    if kind == "csv_header_only":
        (tmp_path / "h.csv").write_text("x,y\n")
        return tmp_path / "h.csv", "2 rows"
    if kind == "csv_not_utf8":
        (tmp_path / "l.csv").write_bytes("caf\u00e9,x\n1,2\n3,4\n".encode("latin-1"))
        return tmp_path / "l.csv", "csv"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "empty", "directory", "unknown_extension", "no_extension", "1d", "3d", "0d", "one_row",
             "nan", "inf", "nan_csv", "strings", "complex", "object_npy", "object_npz", "truncated_npy",
             "header_only_npy", "corrupt_npz", "truncated_npz", "npz_member_not_npy", "npz_empty_archive",
             "npz_saved_as_npy", "npy_saved_as_npz", "csv_text_in_body", "csv_ragged", "csv_header_only",
             "csv_not_utf8"]


@pytest.mark.filterwarnings("error")  # a warning would be a second line on the CLI's stderr
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_a_one_line_user_error_naming_the_file(kind, tmp_path):
    path, word = _write_bad(kind, tmp_path)
    with pytest.raises(UserError) as e:
        load_array(path)
    message = str(e.value)
    assert str(path) in message
    assert word.lower() in message.lower(), message
    assert "\n" not in message


@pytest.mark.parametrize("fmt", ["raw_pickle_npy", "object_array_npy", "object_array_npz"])
def test_pickles_are_refused_without_being_executed(fmt, tmp_path):
    marker = tmp_path / "executed"
    payload = _Boom(marker)
    # control: unpickling the payload really does run code
    pickle.loads(pickle.dumps(payload))
    assert marker.is_dir()
    marker.rmdir()
    if fmt == "raw_pickle_npy":
        path = tmp_path / "p.npy"
        path.write_bytes(pickle.dumps(np.array([[payload, 1]], dtype=object)))
    elif fmt == "object_array_npy":
        path = tmp_path / "o.npy"
        np.save(path, np.array([[payload, 1], [2, 3]], dtype=object), allow_pickle=True)
    else:
        path = tmp_path / "o.npz"
        np.savez(path, x=np.array([[payload, 1], [2, 3]], dtype=object))
    with pytest.raises(UserError) as e:
        load_array(path)
    assert str(path) in str(e.value)
    assert not marker.exists(), "loading the file executed pickled code"


def test_validate_array_names_the_source():
    with pytest.raises(UserError, match="my-array: expected an N x D array"):
        validate_array(np.zeros(3), "my-array")
    x = validate_array(np.ones((2, 2), dtype=np.int32), "ok")
    assert x.dtype == np.float64


# --------------------------------------------------------------------------- scaling


@pytest.fixture
def anisotropic():
    rng = np.random.default_rng(5)
    return rng.normal(size=(1000, 3)) * [1.0, 10.0, 0.1] + [5.0, -3.0, 100.0]


def test_scaling_global_by_hand(anisotropic):
    x = anisotropic
    s = Scaling.fit(x, "global")
    mean = x.sum() / x.size
    std = math.sqrt(((x - mean) ** 2).sum() / x.size)
    np.testing.assert_allclose(s.shift, [mean], rtol=1e-12)
    np.testing.assert_allclose(s.scale, [std], rtol=1e-12)
    z = s.apply(x)
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12  # one global pair: unit variance overall ...
    assert z.std(0)[1] > 5 * z.std(0)[0]  # ... but the shape of the data is kept
    np.testing.assert_allclose(s.invert(z), x, rtol=1e-12, atol=1e-12)
    assert s.log_det(3) == pytest.approx(-3 * math.log(std), rel=1e-12)


def test_scaling_per_dimension_by_hand(anisotropic):
    x = anisotropic
    s = Scaling.fit(x, "per_dimension")
    z = s.apply(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-12)
    np.testing.assert_allclose(s.invert(z), x, rtol=1e-12, atol=1e-12)
    stds = [math.sqrt(((x[:, d] - x[:, d].mean()) ** 2).mean()) for d in range(3)]
    assert s.log_det(3) == pytest.approx(-sum(math.log(v) for v in stds), rel=1e-12)


def test_scaling_none_is_the_identity(anisotropic):
    s = Scaling.fit(anisotropic, "none")
    np.testing.assert_array_equal(s.apply(anisotropic), anisotropic)
    np.testing.assert_array_equal(s.invert(anisotropic), anisotropic)
    assert s.log_det(3) == 0.0


@pytest.mark.parametrize("mode", ["global", "per_dimension"])
def test_scaling_log_det_is_the_change_of_variables(mode, anisotropic):
    """log N(apply(x); 0, I) + log_det = log N(x; shift, diag(scale^2)): the density in original units."""
    s = Scaling.fit(anisotropic, mode)
    x = anisotropic[:20]
    z = s.apply(x)
    scaled = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    shift, scale = np.asarray(s.shift), np.asarray(s.scale)
    original = (-0.5 * ((x - shift) / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)).sum(1)
    np.testing.assert_allclose(scaled + s.log_det(x.shape[1]), original, rtol=1e-12)


def test_scaling_refuses_constant_data_and_unknown_modes():
    x = np.ones((10, 2))
    with pytest.raises(UserError, match="variance"):
        Scaling.fit(x, "global")
    x[:, 0] = np.arange(10)
    with pytest.raises(UserError, match="variance"):
        Scaling.fit(x, "per_dimension")
    with pytest.raises(UserError, match="'minmax'"):
        Scaling.fit(x, "minmax")


# --------------------------------------------------------------------------- split


def test_split_is_seeded_disjoint_and_complete():
    train, test = split(1000, 0.2, seed=3)
    assert len(test) == 200 and len(train) == 800
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = split(1000, 0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    other = split(1000, 0.2, seed=4)
    assert not np.array_equal(test, other[1])
    assert not np.array_equal(test, np.arange(800, 1000))  # shuffled, not the tail


@pytest.mark.parametrize("n, fraction, n_test", [(10, 0.3, 3), (7, 0.4, 3), (2, 0.01, 1), (3, 0.6, 2), (400, 0.25, 100)])
def test_split_sizes(n, fraction, n_test):
    train, test = split(n, fraction, seed=0)
    assert len(test) == n_test and len(train) == n - n_test


@pytest.mark.parametrize("n, fraction", [(10, 0.0), (10, 1.0), (10, -0.1), (10, float("nan")), (1, 0.5)])
def test_split_refuses_impossible_splits(n, fraction):
    with pytest.raises(UserError):
        split(n, fraction, seed=0)
