"""The ``hiermask`` command: ``hiermask demo | fit | predict``.

``hiermask demo`` simulates the manufacturing example, fits it and prints what
the estimator learned; ``hiermask fit`` fits a CSV or Parquet file and saves
the model as a model file (``.hmz``, see :func:`hiermask.load`), or as a
pickle for a ``.joblib``/``.pkl`` suffix; ``hiermask predict`` writes
predictions of a saved model as CSV, and reads a pickle only with
``--allow-pickle``. Errors are reported as one line, ``hiermask: error: ...``, on
stderr: exit status 2 for bad command lines, 1 for everything else.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["main"]

PROG = "hiermask"

#: Summaries with more rows than this print only their population-level rows.
MAX_SUMMARY_ROWS = 60

#: ``fit --out`` with one of these suffixes writes a pickle (joblib); any
#: other suffix writes a model file (``.hmz``), which loads without running code.
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")

#: Why ``predict`` reads a pickle only with ``--allow-pickle``.
PICKLE_WARNING = (
    "loading a pickle runs whatever code the file contains; load only files you "
    "trust, and prefer model files: 'hiermask fit --out model.hmz'"
)


class CLIError(Exception):
    """An error reported to the user as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``hiermask: error: ...``."""

    def error(self, message):
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def _one_line(exc):
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ----------------------------------------------------------------- parsing
def _number(parse, accept, expected):
    """An argparse type: ``parse(text)`` where ``accept`` holds, else an error.

    The one rule of the numeric options: the error names what was
    ``expected`` and quotes the text given (text that does not parse, NaN and
    values out of range alike).
    """

    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_fraction = _number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_positive_float = _number(float, lambda v: 0.0 < v < math.inf, "a positive number")
_threshold = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


#: Sampler options: flag, type, metavar, help; their defaults are the
#: command's own.
SAMPLER_OPTIONS = (
    ("--num-warmup", _positive_int, "N", "NUTS warmup iterations per chain"),
    ("--num-samples", _positive_int, "N", "draws kept per chain"),
    ("--num-chains", _positive_int, "N", "number of chains"),
    ("--target-accept", _fraction, "P", "NUTS step-size adaptation target"),
)


def _add_sampler_options(parser, *, defaults):
    group = parser.add_argument_group("sampler")
    for (flag, kind, metavar, text), default in zip(
        SAMPLER_OPTIONS, defaults, strict=True
    ):
        group.add_argument(
            flag,
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{text} (default: %(default)s)",
        )
    group.add_argument(
        "--seed", type=int, default=0, help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress note or progress bar on stderr",
    )
    _add_cache_option(parser)


def _home_relative(path):
    # ``~/...`` for a path under the home folder (help texts, docs).
    try:
        return f"~/{path.relative_to(Path.home()).as_posix()}"
    except ValueError:
        return str(path)


def _add_cache_option(parser):
    from ._cache import NO_CACHE_ENV, default_cache_dir

    parser.add_argument(
        "--no-cache",
        action="store_true",
        help=(
            "do not use JAX's persistent compilation cache (on by default in "
            f"{_home_relative(default_cache_dir())}, so that the next command loads "
            "the compiled "
            f"programs instead of compiling them; {NO_CACHE_ENV}=1 also turns it "
            "off)"
        ),
    )


def _columns(text):
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected column names, got {text!r}")
    return names


def _add_column_options(parser):
    parser.add_argument(
        "--drop",
        type=_columns,
        default=[],
        metavar="COLS",
        help="comma-separated columns to ignore (e.g. a saved row index)",
    )
    parser.add_argument(
        "--id",
        metavar="COL",
        help="an identifier column, never a feature (predict --id writes it out)",
    )


#: Model options of ``hiermask fit``: flag, estimator parameter, type, help.
MODEL_OPTIONS = (
    ("--coef-prior-scale", "coef_prior_scale", _positive_float,
     "prior sd of the population slopes, in units of sd(y)/sd(x)"),
    ("--intercept-prior-scale", "intercept_prior_scale", _positive_float,
     "prior sd of the intercept at the feature means, in units of sd(y)"),
    ("--group-scale-prior", "group_scale_prior", _positive_float,
     "HalfNormal scale of the between-group sds"),
    ("--noise-prior-scale", "noise_prior_scale", _positive_float,
     "HalfNormal scale of the residual sd, in units of sd(y)"),
    ("--mask-threshold", "mask_threshold", _threshold,
     "a feature is off for a group when its NaN fraction there is at least this"),
)  # fmt: skip


def _varying(text):
    """``--varying``: auto, all, none (no slope varies) or a list of columns."""
    if text in ("auto", "all"):
        return text
    if text == "none":
        return []
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give auto, all, none or comma-separated column names"
        )
    return names


def _add_model_options(parser):
    from ._estimator import MaskedHierarchicalRegressor

    defaults = MaskedHierarchicalRegressor().get_params()
    group = parser.add_argument_group("model")
    for flag, name, kind, text in MODEL_OPTIONS:
        group.add_argument(
            flag,
            dest=name,
            type=kind,
            default=defaults[name],
            metavar="X",
            help=f"{text} (default: %(default)s)",
        )
    group.add_argument(
        "--varying",
        type=_varying,
        default=defaults["varying"],
        metavar="V",
        help="which features get a group-specific slope: auto (all but those "
        "constant within every group), all, none (varying intercept only) or "
        "a comma-separated list of columns (default: %(default)s)",
    )
    group.add_argument(
        "--group-covariance",
        choices=("full", "diagonal"),
        default=defaults["group_covariance"],
        help="correlated (full) or independent (diagonal) group effects "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--lkj-concentration",
        type=_positive_float,
        default=defaults["lkj_concentration"],
        metavar="X",
        help="LKJ prior concentration of the group correlation matrix "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--unseen-groups",
        choices=("population", "error"),
        default=defaults["unseen_groups"],
        help="groups not seen in fit, at predict (default: %(default)s)",
    )


def build_parser():
    """The argument parser of the ``hiermask`` command.

    Returns
    -------
    argparse.ArgumentParser
    """
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description=(
            "Bayesian hierarchical regression with per-group feature masks read "
            "from the NaN pattern of the data."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _add_demo_command(sub)
    _add_fit_command(sub)
    _add_predict_command(sub)
    return parser


def _add_demo_command(sub):
    demo = sub.add_parser(
        "demo",
        help="simulate the manufacturing example, fit it and show the results",
        description=(
            "Simulate two product groups where Cutting_Wait_Time applies only to "
            "Product_Group_2 (NaN in every Product_Group_1 row), fit, and print "
            "the summary, the mask and predictions for one new row per group."
        ),
    )
    demo.add_argument(
        "--n-samples",
        type=_positive_int,
        default=500,
        metavar="N",
        help="rows to simulate (default: %(default)s)",
    )
    demo.add_argument(
        "--plot",
        metavar="DIR",
        type=Path,
        help="write mask.png, shrinkage.png, forest.png and ppc.png into DIR",
    )
    # Two groups say little about the between-group sds: a higher adaptation
    # target avoids the divergences their long-tailed posterior causes.
    _add_sampler_options(demo, defaults=(500, 1000, 4, 0.95))


def _add_fit_command(sub):
    fit = sub.add_parser(
        "fit",
        help="fit a CSV or Parquet file and print the posterior summary",
        description=(
            "Fit MaskedHierarchicalRegressor on a table: every column other than "
            "the target, the group, --id and --drop (or those named by --features) "
            "is a feature, NaN cells included; a feature NaN in every row of a "
            "group is off for it."
        ),
    )
    fit.add_argument("data", type=Path, metavar="DATA", help="a .csv or .parquet file")
    fit.add_argument("--target", required=True, metavar="COL", help="target column")
    fit.add_argument("--group", metavar="COL", help="group column (default: one group)")
    fit.add_argument(
        "--features",
        type=_columns,
        metavar="COLS",
        help="comma-separated feature columns (default: all but the target, group, "
        "id and dropped columns)",
    )
    _add_column_options(fit)
    _add_fit_choices(fit)
    _add_model_options(fit)
    _add_fit_outputs(fit)
    _add_sampler_options(fit, defaults=(500, 1000, 4, 0.8))


def _add_fit_choices(fit):
    fit.add_argument(
        "--pooling",
        choices=("partial", "none", "complete"),
        default="partial",
        help="pooling of the group parameters (default: %(default)s)",
    )
    fit.add_argument(
        "--engine",
        choices=("auto", "collapsed", "direct"),
        default="auto",
        help="inference engine (default: %(default)s)",
    )
    fit.add_argument(
        "--missing",
        choices=("impute", "error"),
        default="impute",
        help="NaN in a feature that applies to the row's group (default: %(default)s)",
    )


def _add_fit_outputs(fit):
    fit.add_argument(
        "--out",
        type=Path,
        metavar="MODEL",
        help=(
            "save the fitted model: a model file that loads without running code "
            "(model.hmz), or a pickle for a .joblib/.pkl suffix"
        ),
    )
    fit.add_argument(
        "--summary-csv",
        type=Path,
        metavar="PATH",
        help="also write the full posterior summary as CSV",
    )


def _add_predict_command(sub):
    predict = sub.add_parser(
        "predict",
        help="predict the rows of a CSV or Parquet file with a saved model",
        description=(
            "Write the posterior-predictive mean and sd of every row (and, with "
            "--interval, a central interval) as CSV."
        ),
    )
    predict.add_argument(
        "model", type=Path, metavar="MODEL", help="a model file (.hmz)"
    )
    predict.add_argument(
        "data", type=Path, metavar="DATA", help="a .csv or .parquet file"
    )
    predict.add_argument(
        "--interval",
        type=_fraction,
        metavar="COVERAGE",
        help="add columns lower and upper of the central interval (e.g. 0.9)",
    )
    predict.add_argument(
        "--out", type=Path, metavar="PATH", help="output CSV (default: stdout)"
    )
    predict.add_argument(
        "--id",
        metavar="COL",
        help="a column of DATA written first in the output, to join on",
    )
    predict.add_argument(
        "--unseen-groups",
        choices=("population", "error"),
        help="groups not seen in fit: predict from the population (with a "
        "warning) or refuse them (default: the fitted model's setting)",
    )
    predict.add_argument(
        "--allow-pickle",
        action="store_true",
        help=(
            "also load a pickle or joblib file; loading one runs any code it "
            "contains, so use this only for files you trust"
        ),
    )
    _add_cache_option(predict)


# --------------------------------------------------------------------- I/O
def read_table(path):
    """Read a CSV or Parquet file into a DataFrame.

    Parameters
    ----------
    path : path-like
        ``.parquet``/``.pq`` files are read with :func:`pandas.read_parquet`,
        anything else as CSV.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    CLIError
        If the file is missing, unreadable, empty or not a table.
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    if path.is_dir():
        raise CLIError(f"{path}: is a directory, expected a .csv or .parquet file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            try:
                df = pd.read_parquet(path)
            except ImportError as exc:
                raise CLIError(
                    f"reading {path} needs a Parquet engine: pip install pyarrow"
                ) from exc
        else:
            df = pd.read_csv(path)
    except CLIError:
        raise
    except pd.errors.EmptyDataError as exc:
        raise CLIError(f"{path}: the file is empty") from exc
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {_one_line(exc)}") from exc
    if df.shape[0] == 0:
        raise CLIError(f"{path}: the table has no rows")
    return df


def _require_columns(df, columns, path):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns[:20]))
        more = "" if df.shape[1] <= 20 else f", ... ({df.shape[1]} in all)"
        raise CLIError(
            f"column(s) {', '.join(map(repr, missing))} not found in {path}; "
            f"its columns are: {have}{more}"
        )


def _out(*lines):
    for line in lines:
        print(line)


def _err(message):
    print(f"{PROG}: {message}", file=sys.stderr)


# ---------------------------------------------------------------- progress
class _Progress:
    """Progress of a fit on stderr.

    On a terminal: the note, the estimator's per-iteration progress bar
    (``progress_bar=True``) while the chains run, and the time taken.
    Elsewhere (a log file, a pipe): the note and the time taken, no bar.
    ``--quiet`` silences all of it.
    """

    def __init__(self, message, quiet, est):
        self.message = message
        self.quiet = quiet
        self.tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        est.set_params(progress_bar=self.tty and not quiet)

    def __enter__(self):
        self.start = time.perf_counter()
        if not self.quiet:
            _err(self.message)
        return self

    def __exit__(self, exc_type, exc, tb):
        elapsed = time.perf_counter() - self.start
        if not self.quiet and exc_type is None:
            _err(f"done in {elapsed:.1f} s")
        return False


class _Warnings(warnings.catch_warnings):
    """Record warnings and print each once as ``hiermask: warning: ...``."""

    def __init__(self):
        super().__init__(record=True)

    def __enter__(self):
        self.log = super().__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        seen = set()
        for w in self.log:
            text = _one_line(w.message)
            if text not in seen:
                seen.add(text)
                _err(f"warning: {text}")
        return False


# ------------------------------------------------------------- formatting
def _format_count(v):
    return "nan" if not np.isfinite(v) else f"{v:.0f}"


def _column_format(values):
    # Fixed decimals for the usual magnitudes, significant digits otherwise.
    finite = np.abs(values[np.isfinite(values)])
    nonzero = finite[finite > 0]
    if nonzero.size == 0 or (0.01 <= np.median(nonzero) < 1e6):
        return lambda v: "nan" if not np.isfinite(v) else f"{v:.3f}"
    return lambda v: "nan" if not np.isfinite(v) else f"{v:.3g}"


def format_summary(summary, max_rows=MAX_SUMMARY_ROWS):
    """Render a posterior summary for the terminal.

    Parameters
    ----------
    summary : pandas.DataFrame
        As returned by ``est.summary()``.
    max_rows : int, default=60
        Above this many rows only the population-level rows are shown.

    Returns
    -------
    str
    """
    table = summary.copy()
    omitted = 0
    if table.shape[0] > max_rows:
        group_level = table.index.str.startswith(("intercept[", "coef["))
        omitted = int(group_level.sum())
        table = table[~group_level]
    formatters = {}
    for col in table.columns:
        if col in ("ess_bulk", "ess_tail"):
            formatters[col] = _format_count
        elif col == "r_hat":
            formatters[col] = "{:.3f}".format
        else:
            formatters[col] = _column_format(table[col].to_numpy(dtype=float))
    text = table.to_string(formatters=formatters, na_rep="nan")
    if omitted:
        text += (
            f"\n({omitted} group-level rows not shown; write them all with "
            "--summary-csv PATH)"
        )
    return text


def _convergence_line(est):
    c = est.convergence_
    return (
        f"convergence: max r_hat {c['max_r_hat']:.3f}, min bulk ESS "
        f"{c['min_ess_bulk']:.0f}, {c['n_divergences']} divergent transition(s)"
    )


def _fit_note(n_rows, n_groups, n_features, args):
    return (
        f"fitting {n_rows} rows, {n_groups} group(s), {n_features} feature(s) "
        f"with NUTS ({args.num_chains} chain(s) x "
        f"{args.num_warmup} + {args.num_samples} iterations)..."
    )


def _estimator(args, **params):
    from ._estimator import MaskedHierarchicalRegressor

    return MaskedHierarchicalRegressor(
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        target_accept_prob=args.target_accept,
        random_state=args.seed,
        **params,
    )


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CLIError('--plot needs matplotlib: pip install "hiermask[plot]"') from exc


def write_plots(est, X, y, directory):
    """Write the four diagnostic plots of a fitted estimator as PNG files.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    X, y : DataFrame and Series
        The training data (for the shrinkage and predictive-check plots).
    directory : path-like
        Created if needed.

    Returns
    -------
    list of pathlib.Path
        ``mask.png``, ``shrinkage.png``, ``forest.png`` and ``ppc.png``.
    """
    from matplotlib.figure import Figure

    from . import plotting

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jobs = {
        "mask.png": ((7, 3.2), lambda ax: plotting.plot_mask(est, ax=ax)),
        "shrinkage.png": ((7, 5), lambda ax: plotting.plot_shrinkage(est, X, y, ax=ax)),
        "forest.png": ((7, 5), lambda ax: plotting.plot_forest(est, ax=ax)),
        "ppc.png": ((7, 4.5), lambda ax: plotting.plot_ppc(est, X, y, ax=ax)),
    }
    paths = []
    for name, (size, draw) in jobs.items():
        fig = Figure(figsize=size, layout="constrained")
        draw(fig.subplots())
        path = directory / name
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


# --------------------------------------------------------------- commands
def cmd_demo(args):
    """``hiermask demo``."""
    if args.n_samples < 4:
        raise CLIError("--n-samples must be at least 4 (two rows per group)")
    if args.plot is not None:
        _require_matplotlib()
    X, y, est = _demo_fit(args)
    _out(*_demo_data_lines(X, est))
    _out(_demo_coefficients(est).to_string())
    table = est.summary()
    _out("", "Posterior summary:", format_summary(table))
    _out(table.attrs["varying"])
    _out(_convergence_line(est), "")
    _out(
        "Predictions for one new row per group (sd includes the noise):",
        _demo_predictions(est).to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        ),
    )
    if args.plot is not None:
        paths = write_plots(est, X, y, args.plot)
        _out("", "Plots: " + ", ".join(str(p) for p in paths))
    return 0


def _demo_fit(args):
    # The simulated manufacturing data and the estimator fitted on them.
    from .datasets import MANUFACTURING_FEATURES, make_manufacturing

    X, y = make_manufacturing(args.n_samples, random_state=args.seed)
    est = _estimator(args, group_col="Product_Group")
    note = _fit_note(len(X), 2, len(MANUFACTURING_FEATURES), args)
    with _Warnings(), _Progress(note, args.quiet, est):
        est.fit(X, y)
    return X, y, est


def _demo_data_lines(X, est):
    # The data's groups, the mask, and the heading of the coefficients.
    from .datasets import MANUFACTURING_GROUPS

    sizes = X["Product_Group"].value_counts()
    g1, g2 = MANUFACTURING_GROUPS
    return (
        "Simulated manufacturing data: "
        f"{len(X)} rows, {g1} ({sizes[g1]} rows) and {g2} ({sizes[g2]} rows).",
        f"Cutting_Wait_Time is NaN in every {g1} row, so it is off for that group.",
        "",
        "Mask (True: the feature applies to the group):",
        est.mask_.to_string(),
        "",
        "Coefficients: posterior mean (true value)",
    )


def _demo_coefficients(est):
    # Each group's posterior mean slopes beside the simulation's true values
    # ("off" where the mask has no coefficient).
    from .datasets import MANUFACTURING_TRUE_COEF

    coef = pd.DataFrame(est.coef_, index=est.mask_.index, columns=est.mask_.columns)
    shown = coef.copy().astype(object)
    for g in coef.index:
        for f in coef.columns:
            truth = MANUFACTURING_TRUE_COEF.loc[g, f]
            shown.loc[g, f] = (
                f"{coef.loc[g, f]:.3f} ({truth:g})" if est.mask_.loc[g, f] else "off"
            )
    return shown


def _demo_predictions(est):
    # One new row per group: the predictive mean and sd, and the true mean.
    from .datasets import MANUFACTURING_GROUPS, MANUFACTURING_TRUE_COEF

    g1, g2 = MANUFACTURING_GROUPS
    new = pd.DataFrame(
        {
            "Product_Group": [g1, g2],
            "Feed_Speed": [3.0, 3.0],
            "Pull_Acceleration": [2.0, 2.0],
            "Cutting_Wait_Time": [np.nan, 2.0],
        }
    )
    with _Warnings():
        mean, sd = est.predict(new, return_std=True)
    truth = [
        float(
            MANUFACTURING_TRUE_COEF.loc[g].to_numpy()
            @ np.nan_to_num(new.iloc[i, 1:].to_numpy(dtype=float))
        )
        for i, g in enumerate(new["Product_Group"])
    ]
    return new.assign(mean=mean, sd=sd, true_mean=truth)


#: Column names that pandas and R give a row index written to CSV.
SAVED_INDEX = re.compile(r"^(Unnamed: \d+|index|rownames|X|\.\.\.1)$")


def _fit_columns(df, args):
    """The feature columns of ``hiermask fit``, checked against the table."""
    needed = [args.target, *(c for c in (args.group, args.id) if c is not None)]
    needed += list(args.drop) + list(args.features or [])
    _require_columns(df, needed, args.data)
    if args.group is not None and args.group == args.target:
        raise CLIError("--target and --group name the same column")
    excluded = {args.target, args.group, args.id, *args.drop}
    chosen = args.features if args.features is not None else list(df.columns)
    features = [c for c in chosen if c not in excluded]
    if not features and args.group is None:
        raise CLIError(f"{args.data} has no feature columns besides the target")
    for name in features:
        if SAVED_INDEX.match(str(name)) and _looks_like_row_numbers(df[name]):
            _err(
                f"warning: column {name!r} looks like a saved row index and is "
                f"fitted as a feature; leave it out with --drop {name!r}"
            )
    return features


def _looks_like_row_numbers(column):
    if str(column.name).startswith("Unnamed: "):
        return True
    values = column.to_numpy()
    n = len(values)
    return pd.api.types.is_integer_dtype(column.dtype) and (
        np.array_equal(values, np.arange(n))
        or np.array_equal(values, np.arange(1, n + 1))
    )


def _mask_lines(est, X, features):
    """The mask (groups with a feature off, when there are many groups) and
    the number of imputed cells, for the terminal."""
    mask = est.mask_
    lines = ["", "Mask (True: the feature applies to the group):"]
    if mask.to_numpy().all():
        lines = ["", "Mask: every feature applies to every group."]
    elif mask.shape[0] > MAX_SUMMARY_ROWS:
        partial = mask[~mask.all(axis=1)]
        lines.append(
            f"({mask.shape[0] - partial.shape[0]} of {mask.shape[0]} groups have "
            "every feature on; the others:)"
        )
        mask = partial
    if not mask.to_numpy().all():
        lines.append(mask.to_string())
    if est.group_col is None:
        on = np.broadcast_to(est.mask_.to_numpy()[0], (len(X), len(features)))
    else:
        on = est.mask_.loc[X[est.group_col]].to_numpy()
    imputed = pd.Series((X[features].isna().to_numpy() & on).sum(axis=0), features)
    shown = ", ".join(f"{k} {v}" for k, v in imputed[imputed > 0].items())
    lines.append(
        f"imputed cells (NaN in a feature that applies): {int(imputed.sum())}"
        + (f" ({shown})" if shown else "")
    )
    return lines


def cmd_fit(args):
    """``hiermask fit``."""
    df = read_table(args.data)
    features = _fit_columns(df, args)
    columns = ([args.group] if args.group is not None else []) + features
    X = df[columns]
    y = df[args.target]
    if not pd.api.types.is_numeric_dtype(y):
        raise CLIError(f"target column {args.target!r} is not numeric")
    text = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    if text:
        raise CLIError(
            f"feature column(s) {', '.join(map(repr, text))} are not numeric; "
            "encode them or leave them out with --drop"
        )
    n_groups = df[args.group].nunique() if args.group is not None else 1
    if args.out is not None and not args.out.parent.exists():
        raise CLIError(f"{args.out.parent}: no such directory")

    est = _estimator(
        args,
        group_col=args.group,
        pooling=args.pooling,
        engine=args.engine,
        missing=args.missing,
        unseen_groups=args.unseen_groups,
        varying=args.varying,
        group_covariance=args.group_covariance,
        lkj_concentration=args.lkj_concentration,
        **{name: getattr(args, name) for _, name, _, _ in MODEL_OPTIONS},
    )
    note = _fit_note(len(X), n_groups, len(features), args)
    with _Warnings(), _Progress(note, args.quiet, est):
        est.fit(X, y)
    # Only the rows that are printed (or written) are summarized.
    summary = est.summary(group_level=False)
    n_group_rows = len(est.groups_) + int(est.mask_.to_numpy().sum())
    full = len(summary) + n_group_rows <= MAX_SUMMARY_ROWS
    if full or args.summary_csv is not None:
        summary = est.summary()
    text = format_summary(summary)
    if not full and args.summary_csv is None:
        text += (
            f"\n({n_group_rows} group-level rows not shown; write them all with "
            "--summary-csv PATH)"
        )
    _out(text, summary.attrs["varying"], _convergence_line(est))
    _out(*_mask_lines(est, X, features))
    if args.summary_csv is not None:
        summary.to_csv(args.summary_csv)
        _out(f"summary written to {args.summary_csv}")
    if args.out is not None:
        _save_model(est, args.out)
        _out(f"model saved to {args.out}")
    return 0


def _save_model(est, path):
    try:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            import joblib

            joblib.dump(est, path)
        else:
            est.save(path)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {_one_line(exc)}") from exc


def load_model(path, allow_pickle=False):
    """Load a model saved by ``hiermask fit --out``.

    Parameters
    ----------
    path : path-like
        A model file (read with :func:`hiermask.load`: zip archive, ``.hmz``),
        or with ``allow_pickle`` a pickle or joblib file.
    allow_pickle : bool, default=False
        Whether a file that is not a model file is loaded with joblib, which
        runs any code the file contains; a warning says so.

    Returns
    -------
    MaskedHierarchicalRegressor

    Raises
    ------
    CLIError
        If the file is missing or does not hold a fitted hiermask model, or
        is not a model file and ``allow_pickle`` is False.
    """
    from ._files import load

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    with path.open("rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped or path.suffix.lower() == ".hmz":
        return load(path)  # a ModelFileError is reported as one line
    if not allow_pickle:
        raise CLIError(
            f"{path} is not a model file (.hmz); if it is a pickle or joblib file "
            "that you trust, pass --allow-pickle (loading a pickle runs any code "
            "it contains)"
        )
    warnings.warn(PICKLE_WARNING, UserWarning, stacklevel=2)
    return _load_pickle(path)


def _load_pickle(path):
    import joblib
    from sklearn.exceptions import NotFittedError

    from ._estimator import MaskedHierarchicalRegressor
    from ._fitted import fitted_model

    try:
        est = joblib.load(path)
    except ValueError as exc:
        raise CLIError(f"cannot load {path}: {_one_line(exc)}") from exc
    except Exception as exc:
        raise CLIError(
            f"{path} is not a model saved by 'hiermask fit --out' "
            f"({type(exc).__name__})"
        ) from exc
    if isinstance(est, MaskedHierarchicalRegressor):
        try:
            fitted_model(est)  # fitted, with its model
            return est
        except (NotFittedError, TypeError):
            pass
    raise CLIError(f"{path} does not hold a fitted MaskedHierarchicalRegressor")


def cmd_predict(args):
    """``hiermask predict``."""
    with _Warnings():
        est = load_model(args.model, allow_pickle=args.allow_pickle)
    df = read_table(args.data)
    names = getattr(est, "feature_names_in_", None)
    if names is not None:
        _require_columns(df, list(names), args.data)
        X = df[list(names)]
    else:
        if df.shape[1] != est.n_features_in_:
            raise CLIError(
                f"{args.data} has {df.shape[1]} columns; the model expects "
                f"{est.n_features_in_}"
            )
        X = df
    if args.id is not None:
        _require_columns(df, [args.id], args.data)
    if args.unseen_groups is not None:
        est.set_params(unseen_groups=args.unseen_groups)
    with _Warnings():
        mean, sd = est.predict(X, return_std=True)
        out = pd.DataFrame({"mean": mean, "sd": sd})
        if args.id is not None:
            out.insert(0, args.id, df[args.id].to_numpy())
        if args.interval is not None:
            bounds = est.predict_interval(X, coverage=args.interval)
            out["lower"], out["upper"] = bounds[:, 0], bounds[:, 1]
    if args.out is None:
        out.to_csv(sys.stdout, index=False)
    else:
        try:
            out.to_csv(args.out, index=False)
        except OSError as exc:
            raise CLIError(f"cannot write {args.out}: {_one_line(exc)}") from exc
        if not getattr(args, "quiet", False):
            _err(f"{len(out)} predictions written to {args.out}")
    return 0


COMMANDS = {"demo": cmd_demo, "fit": cmd_fit, "predict": cmd_predict}


def command(argv: list[str] | None = None) -> int:
    """Entry point of the ``hiermask`` command (and ``python -m hiermask``).

    :func:`main` with JAX's persistent compilation cache turned on for this
    process (:func:`hiermask.enable_compilation_cache` in its default folder),
    unless ``--no-cache`` is given or ``HIERMASK_NO_CACHE`` is set: the command
    owns its process, so a second ``hiermask fit`` loads the programs the
    first one compiled. :func:`main` itself, called from Python, leaves JAX's
    configuration alone.

    Parameters
    ----------
    argv : list of str, default=None
        Arguments without the program name; None reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status, as :func:`main`'s.

    Examples
    --------
    >>> from hiermask.cli import command
    >>> command(["--version"])  # doctest: +ELLIPSIS
    hiermask ...
    0
    """
    return _main(argv, cache=True)


def main(argv: list[str] | None = None) -> int:
    """Run the ``hiermask`` command.

    Parameters
    ----------
    argv : list of str, default=None
        Arguments without the program name; None reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 2 for a bad command line, 1 for any
        other error (reported as one line on stderr, without a traceback).

    Examples
    --------
    >>> from hiermask.cli import main
    >>> main(["demo", "--n-samples", "60", "--num-warmup", "100",
    ...       "--num-samples", "100", "--num-chains", "2", "--quiet"])
    ... # doctest: +ELLIPSIS
    Simulated manufacturing data: 60 rows, ...
    Mask (True: the feature applies to the group):
    ...
    0
    """
    return _main(argv, cache=False)


def _main(argv, *, cache):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if cache and not getattr(args, "no_cache", False):
        from ._cache import cache_disabled_by_env, enable_compilation_cache

        if not cache_disabled_by_env():
            enable_compilation_cache()
    try:
        return COMMANDS[args.command](args)
    except CLIError as exc:
        _err(f"error: {exc}")
    except KeyboardInterrupt:
        _err("error: interrupted")
        return 130
    except (ValueError, TypeError, OSError, ImportError, KeyError) as exc:
        _err(f"error: {_one_line(exc)}")
    except Exception as exc:  # never a traceback on the command line
        _err(f"error: {type(exc).__name__}: {_one_line(exc)}")
    return 1
