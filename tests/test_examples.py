"""The scripts in examples/ run with tiny settings (issue 4)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from .conftest import FAST

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = [
    "--num-warmup",
    str(FAST["num_warmup"]),
    "--num-samples",
    str(FAST["num_samples"]),
    "--num-chains",
    str(FAST["num_chains"]),
    "--seed",
    str(FAST["random_state"]),
]

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


@pytest.fixture(autouse=True)
def _close_figures():
    """The scripts leave their pyplot figure open (the gallery collects it)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manufacturing_masking(capsys):
    result = _load("manufacturing_masking").main(TINY)
    out = capsys.readouterr().out
    assert "Mask read from the NaN pattern" in out
    coef, truth = result["coef"], result["truth"]
    assert coef.loc["Product_Group_1", "Cutting_Wait_Time"] == 0.0
    np.testing.assert_allclose(coef.to_numpy(), truth.to_numpy(), atol=0.3)
    preds = result["predictions"]
    np.testing.assert_allclose(preds["mean"], preds["truth"], atol=0.5)
    assert (preds["lower"] < preds["truth"]).all()
    assert (preds["truth"] < preds["upper"]).all()
    assert len(result["figure"].axes) >= 2


def test_pooling_schools(tmp_path, capsys):
    plot = tmp_path / "shrinkage.png"
    result = _load("pooling_schools").main([*TINY, "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "Root-mean-square error" in out
    assert plot.stat().st_size > 1000
    table = result["estimates"]
    assert list(table.columns) == [
        "n",
        "sample_mean",
        "none",
        "partial",
        "complete",
        "truth",
    ]
    assert len(table) == 8
    # Complete pooling: one mean for all; partial pooling: less spread than none.
    assert np.ptp(table["complete"]) < 1e-8
    assert table["partial"].std() < table["none"].std()
    assert np.isfinite(result["rmse"]).all()


def test_missing_x_imputation(capsys):
    result = _load("missing_x_imputation").main(TINY)
    out = capsys.readouterr().out
    assert "Complete-case OLS uses 70 rows" in out
    table = result["table"]
    assert list(table.index) == ["intercept", "slope"]
    np.testing.assert_allclose(table["complete_case"], table["truth"], atol=0.5)
    np.testing.assert_allclose(table["imputation"], table["truth"], atol=0.5)
    assert (table["imputation_sd"] > 0).all()
    assert len(result["figure"].axes) == 2


def test_radon_uranium(tmp_path, capsys):
    plot = tmp_path / "radon.png"
    result = _load("radon_uranium").main([*TINY, "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "population slope only for log_uranium (constant within every" in out
    assert "Held-out error on the homes of counties never seen in fit" in out
    assert result["varying"].to_dict() == {"floor": True, "log_uranium": False}
    rmse = result["rmse"]
    assert list(rmse.index) == [
        "floor + log_uranium, varying='auto'",
        "floor, varying intercept only",
    ]
    # the county's uranium predicts the unseen counties better
    assert rmse.iloc[0] < rmse.iloc[1]
    assert plot.stat().st_size > 1000
