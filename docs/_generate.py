"""Pages generated at build time, so that they cannot go stale.

- the command-line reference, from the argparse parser of ``hiermask.cli``;
- an example command-line session, run for real;
- the benchmark tables and the scaling plot, from ``benchmarks/results/*.json``.

Everything is written under ``docs/_generated/`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

#: Width of the generated ``--help`` texts.
HELP_WIDTH = "88"

#: Sampler arguments of the gallery scripts and the CLI session under
#: ``HIERMASK_DOCS_FAST=1``, the one switch for short runs at build time.
FAST_ARGS = ("--num-warmup", "300", "--num-samples", "500", "--num-chains", "2")


def sampler_args() -> list[str]:
    """``FAST_ARGS`` when ``HIERMASK_DOCS_FAST`` is set (and not 0), else none."""
    fast = os.environ.get("HIERMASK_DOCS_FAST", "") not in ("", "0")
    return list(FAST_ARGS) if fast else []


def gallery_argv(gallery_conf, script_vars) -> list[str]:
    """sphinx-gallery's ``reset_argv``: the command line of every script."""
    return sampler_args()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line if line else "" for line in text.splitlines())


# --------------------------------------------------------------- command line
def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def cli_reference(out: Path) -> None:
    """Write ``cli_reference.rst``: the ``--help`` of the command and of every
    subcommand, as argparse prints it."""
    from hiermask.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser = build_parser()
        parts = [
            "``hiermask``",
            "-------------",
            "",
            ".. code-block:: text",
            "",
            _indent(parser.format_help()),
            "",
        ]
        for name, sub in _subparsers(parser).items():
            title = f"``hiermask {name}``"
            parts += [
                title,
                "-" * len(title),
                "",
                ".. code-block:: text",
                "",
                _indent(sub.format_help()),
                "",
            ]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    _write(out / "cli_reference.rst", "\n".join(parts) + "\n")


def cli_session(out: Path, sampler_args: list[str]) -> None:
    """Run ``hiermask fit`` and ``hiermask predict`` on simulated CSV files in
    a temporary folder and write the session as ``cli_session.rst``."""
    import numpy as np
    import pandas as pd

    from hiermask.datasets import make_manufacturing

    with tempfile.TemporaryDirectory() as tmp:
        X, y = make_manufacturing(300, random_state=0)
        X.assign(Production_Speed=y).to_csv(Path(tmp) / "data.csv", index=False)
        new = pd.DataFrame(
            {
                "Product_Group": ["Product_Group_1", "Product_Group_2", "New_Group"],
                "Feed_Speed": [3.0, 3.0, 3.0],
                "Pull_Acceleration": [2.0, 2.0, 2.0],
                "Cutting_Wait_Time": [np.nan, 2.0, 2.0],
            }
        )
        new.to_csv(Path(tmp) / "new.csv", index=False)
        commands = [
            ["head", "-3", "data.csv"],
            [
                "hiermask",
                "fit",
                "data.csv",
                "--target",
                "Production_Speed",
                "--group",
                "Product_Group",
                "--out",
                "model.hmz",
                *sampler_args,
            ],
            ["cat", "new.csv"],
            ["hiermask", "predict", "model.hmz", "new.csv", "--interval", "0.9"],
        ]
        lines = []
        # The command imports the same hiermask as the documentation.
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, COLUMNS=HELP_WIDTH, JAX_PLATFORMS="cpu", PYTHONPATH=path)
        for command in commands:
            argv = command
            if command[0] == "hiermask":
                argv = [sys.executable, "-m", "hiermask", *command[1:]]
            run = subprocess.run(
                argv,
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if run.returncode != 0:
                raise RuntimeError(
                    f"{shlex.join(command)} failed ({run.returncode}):\n{run.stderr}"
                )
            lines.append("$ " + shlex.join(command))
            lines += (run.stderr + run.stdout).rstrip("\n").splitlines()
    text = ".. code-block:: console\n\n" + _indent("\n".join(lines)) + "\n"
    _write(out / "cli_session.rst", text)


# ----------------------------------------------------------------- benchmarks
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append("   * - " + str(row[0]))
        lines += ["     - " + str(cell) for cell in row[1:]]
    return "\n".join(lines) + "\n"


def _s(value) -> str:
    """Seconds: two decimals, or two significant digits below 0.1 s."""
    if value is None:
        return ""
    return f"{value:.2f}" if value == 0 or value >= 0.1 else f"{value:.2g}"


STAGES = [
    ("validate_s", "validate"),
    ("stats_s", "statistics"),
    ("trace_s", "trace"),
    ("compile_s", "compile"),
    ("sample_s", "sampling"),
    ("draws_s", "conditional draws"),
    ("diag_s", "diagnostics"),
    ("post_s", "post-processing"),
]


def _fit_rows(rows, label):
    out = []
    for row in rows:
        out.append(
            [label(row), _s(row["fit_s"])]
            + [_s(row.get(key)) for key, _ in STAGES]
            + [
                f"{row['max_r_hat']:.4f}" if "max_r_hat" in row else "",
                f"{row['min_ess_bulk']:.0f}" if "min_ess_bulk" in row else "",
                str(row.get("divergences", "")),
            ]
        )
    return out


FIT_HEADER = (
    ["case", "time (s)"]
    + [name for _, name in STAGES]
    + ["max r_hat", "min ESS", "div."]
)


def _peers_section(peers: dict) -> str:
    """The table of ``benchmarks/bench_peers.py``'s results."""
    settings = peers["settings"]
    loads = [row["load_before"] for row in peers["rows"]]
    title = "Other tools, the radon model"
    text = (
        f".. _bench-peers:\n\n{title}\n{'~' * len(title)}\n\n"
        f"``{peers['command'].strip()}`` (the ``peers`` extra): "
        f"{settings['chains']} chains x ({settings['warmup']} warmup + "
        f"{settings['draws']} draws), each tool in a fresh process, wall time "
        "with compilation; ESS is the smallest bulk ESS over the five "
        "population parameters. 1-minute load average before each tool "
        f"{min(loads):.1f} to {max(loads):.1f}: other work shared the 2 cores, "
        "so the ratios are those of one run.\n\n"
    )
    rows = [
        [
            row["counties"],
            f"{row['rows']:,}",
            row["tool"],
            f"{row['wall_s']:.1f}",
            "" if row["min_ess_bulk"] is None else f"{row['min_ess_bulk']:.0f}",
            f"{row['ess_per_s']:.1f}" if "ess_per_s" in row else "",
            f"{row['hiermask_ratio']:.1f}" if "hiermask_ratio" in row else "",
        ]
        for row in peers["rows"]
    ]
    header = ["counties", "rows", "tool", "wall (s)", "min ESS", "ESS/s"]
    return text + _table([*header, "hiermask's ESS/s over it"], rows)


def benchmark_pages(out: Path, results: Path) -> None:
    """Write ``benchmark_tables.rst`` and ``scaling.png`` from the JSON
    results of ``benchmarks/bench_engines.py``, ``bench_dask.py`` and
    ``sbc.py``."""
    bench = json.loads((results / "bench_engines.json").read_text())
    parts = []

    def section(key, title, flag, header, rows):
        entry = bench[key]
        load = (entry.get("load_average_start"), entry.get("load_average_end"))
        parts.append(f"{title}\n{'~' * len(title)}\n")
        parts.append(
            f"``python benchmarks/bench_engines.py --{flag}``; 1-minute load "
            f"average {load[0]:.1f} before and {load[1]:.1f} after; "
            f"{entry['seconds']:.0f} s in all.\n"
        )
        parts.append(_table(header, rows))

    section(
        "manufacturing",
        "Manufacturing example, 500 rows",
        "manufacturing",
        ["coef_prior_scale", *FIT_HEADER],
        [
            [row.get("coef_prior_scale", ""), *cells]
            for row, cells in zip(
                bench["manufacturing"]["rows"],
                _fit_rows(bench["manufacturing"]["rows"], lambda r: r["case"]),
                strict=True,
            )
        ],
    )
    section(
        "coldstart",
        "Fresh processes: first fit, command line, parallel model selection",
        "coldstart",
        ["benchmark", "code", "case", "wall (s)", "fit", "trace", "compile", "run"],
        [
            [r["bench"], r["code"], r["case"]]
            + [
                _s(r[k]) if k in r else ""
                for k in ("wall_s", "fit_s", "trace_s", "compile_s", "run_s")
            ]
            for r in bench["coldstart"]["rows"]
        ],
    )
    section(
        "ess",
        "Effective samples per second, 10,000 rows",
        "ess",
        ["case", "draws", "fit (s)", "min ESS", "ESS/s", "x baseline", "max r_hat"],
        [
            [
                r["case"],
                r["draws"],
                _s(r["fit_s"]),
                f"{r['min_ess']:.0f}",
                f"{r['ess_per_s']:.1f}",
                f"{r['vs_baseline']:.0f}",
                f"{r['max_r_hat']:.4f}",
            ]
            for r in bench["ess"]["rows"]
        ],
    )
    # What fit holds: whether it kept the group draws, posterior_'s MB and
    # the process's peak resident memory, where the benchmark recorded them.
    held = {
        "group_draws_kept": ("group draws kept", lambda v: "yes" if v else "no"),
        "posterior_mb": ("``posterior_`` (MB)", lambda v: f"{v:.0f}"),
        "peak_rss_mb": ("peak RSS (MB)", lambda v: f"{v:.0f}"),
    }
    for key, title in (
        ("million", "1,000,000 rows, 100 groups, 10 features"),
        ("groups", "10,000 groups x 20 rows, 5 features"),
        ("manygroups", "10,000 and 100,000 groups x 10 rows, 3 features"),
    ):
        if key not in bench:
            continue
        rows = bench[key]["rows"]
        extra = [k for k in held if any(k in r for r in rows)]
        section(
            key,
            title,
            key,
            [*FIT_HEADER, "predict (s)", *(held[k][0] for k in extra)],
            [
                [*cells, _s(r.get("predict_s"))]
                + [held[k][1](r[k]) if k in r else "" for k in extra]
                for r, cells in zip(
                    rows, _fit_rows(rows, lambda r: r["case"]), strict=True
                )
            ],
        )
    if "datapass" in bench:
        section(
            "datapass",
            "The data pass: 10,000,000 rows, 10 groups, 3 features",
            "datapass",
            [
                "NumPy pass (s)",
                "fit (s)",
                "x NumPy",
                "validate",
                "statistics",
                "sampler",
                "predict (s)",
                "NumPy predict (s)",
                "x NumPy",
                "peak extra (MB)",
                "x input",
            ],
            [
                [
                    _s(r["numpy_pass_s"]),
                    _s(r["fit_s"]),
                    f"{r['fit_vs_numpy']:.1f}",
                    _s(r["validate_s"]),
                    _s(r["stats_s"]),
                    _s(r["sampler_s"]),
                    _s(r["predict_s"]),
                    _s(r["numpy_predict_s"]),
                    f"{r['predict_vs_numpy']:.1f}",
                    f"{r['fit_peak_extra_mb']:.0f}",
                    f"{r['peak_vs_input']:.1f}",
                ]
                for r in bench["datapass"]["rows"]
            ],
        )
        parts.append(
            "The NumPy pass sorts the rows by group and forms every group's Gram "
            "matrix and X'y with BLAS; NumPy predict is "
            "``intercept[g] + (X * coef[g]).sum(1)``. The sampler was compiled "
            "before (a fit with the same groups and features), so the fit is its "
            "pass over the data plus a 1 x (50 + 50) run.\n\n"
        )
    if "covariance" in bench:
        section(
            "covariance",
            'group_covariance "full" against "diagonal", 100,000 rows, 100 groups',
            "covariance",
            ["effects at", "case", "first fit (s)", "trace", "compile", "sample"]
            + ["draws"]
            + ["min ESS", "ESS/s", "ESS/s sampling", "max r_hat"]
            + ["fit / diagonal", "ESS/s / diagonal"],
            [
                [r.get("effects_at", "zero"), r["case"]]
                + [_s(r[k]) for k in ("first_fit_s", "trace_s", "compile_s")]
                + [_s(r["sample_s"]), _s(r["draws_s"]), f"{r['min_ess_bulk']:.0f}"]
                + [f"{r['ess_per_s']:.1f}", f"{r['ess_per_sample_s']:.0f}"]
                + [f"{r['max_r_hat']:.4f}"]
                + [f"{r['fit_vs_diagonal']:.2f}", f"{r['ess_per_s_vs_diagonal']:.2f}"]
                for r in bench["covariance"]["rows"]
            ],
        )
    if "missing" in bench:
        section(
            "missing",
            "Latent cells: 50,000 rows, 200 groups, 8 features, 0.1% of cells NaN",
            "missing",
            ["case", "latent cells", "first fit (s)", "compile", "sample"]
            + ["steps (kept draws)", "fit / complete", "sample / complete"],
            [
                [r["case"], r["latent_cells"]]
                + [_s(r[k]) for k in ("first_fit_s", "compile_s", "sample_s")]
                + [r["steps"]]
                + [
                    f"{r[k]:.2f}" if k in r else ""
                    for k in ("first_fit_vs_complete", "sample_vs_complete")
                ]
                for r in bench["missing"]["rows"]
            ],
        )
    section(
        "gridsearch",
        "GridSearchCV, 5 folds x 4 prior scales, 10,000 rows",
        "gridsearch",
        ["case", "fits", "time (s)", "per fit (s)", "compilations"],
        [
            [
                r["case"],
                r["fits"],
                _s(r["fit_s"]),
                _s(r["per_fit_s"]),
                r["compilations"],
            ]
            for r in bench["gridsearch"]["rows"]
        ],
    )
    scaling = bench["scaling"]["rows"]
    section(
        "scaling",
        "Scaling in rows and in groups",
        "scaling",
        ["axis", "size", *FIT_HEADER[1:]],
        [
            [r["axis"], f"{r['size']:,}", *cells[1:]]
            for r, cells in zip(
                scaling, _fit_rows(scaling, lambda r: r["case"]), strict=True
            )
        ],
    )
    parts.append(
        ".. image:: /_generated/scaling.png\n"
        "   :alt: fit time against rows and groups\n"
    )

    dask = json.loads((results / "dask.json").read_text())
    parts.append(".. _bench-dask:\n\nDask, 100,000,000 rows\n~~~~~~~~~~~~~~~~~~~~~~\n")
    parts.append(
        "``python benchmarks/bench_dask.py``; 1-minute load average "
        f"{dask['load_average_before'][0]:.1f} before and "
        f"{dask['load_average_after'][0]:.1f} after.\n"
    )
    conv = dask["convergence"]
    parts.append(
        _table(
            ["quantity", "value"],
            [
                [
                    "rows x features, groups",
                    f"{dask['rows']:,} x {dask['features']}, {dask['groups']:,}",
                ],
                [
                    "partitions, workers x threads",
                    f"{dask['partitions']}, "
                    f"{dask['workers']} x {dask['threads_per_worker']}",
                ],
                [
                    "chains x (warmup + draws)",
                    f"{dask['num_chains']} x "
                    f"({dask['num_warmup']} + {dask['num_samples']})",
                ],
                [
                    "statistics passes (s)",
                    f"{dask['pass1_s']:.0f} + {dask['pass2_s']:.0f}",
                ],
                ["rows/s over both passes", f"{dask['dask_stats_rows_per_s']:,.0f}"],
                ["one NumPy pass, same rows (s)", f"{dask['numpy_total_s']:.0f}"],
                [
                    "Gram matrices, max relative difference",
                    f"{dask['gram_max_rel_diff_vs_dask']:.1e}",
                ],
                ["NUTS on the client (s)", f"{dask['sampling_s']:.0f}"],
                ["whole fit (s)", f"{dask['fit_s']:.0f}"],
                [
                    "peak memory per worker / client (GB)",
                    f"{max(dask['worker_peak_rss_bytes']) / 1e9:.2f} / "
                    f"{dask['client_peak_rss_bytes'] / 1e9:.2f}",
                ],
                [
                    "max r_hat, min bulk ESS, divergences",
                    f"{conv['max_r_hat']:.3f}, {conv['min_ess_bulk']:.0f}, "
                    f"{conv['n_divergences']}",
                ],
            ],
        )
    )

    parts.append(_peers_section(json.loads((results / "peers.json").read_text())))

    sbc = json.loads((results / "sbc.json").read_text())
    parts.append("Simulation-based calibration\n~~~~~~~~~~~~~~~~~~~~~~~~~~~~\n")
    parts.append(
        "``python benchmarks/sbc.py``: per engine and pooling, the smallest "
        "p-value of the chi-square uniformity test of the ranks over the "
        "parameters (the test is at a family-wise 1% per mode).\n"
    )
    sbc_rows = []
    for mode, entry in sbc.items():
        p = min(param["p_value"] for param in entry["params"].values())
        sbc_rows.append(
            [
                mode,
                entry["n_datasets"],
                f"{entry['n_groups']} x {entry['n_per_group']}",
                f"{entry['num_chains']} x "
                f"({entry['num_warmup']} + {entry['num_samples']})",
                f"{p:.3f}",
                entry.get("source", ""),
            ]
        )
    parts.append(
        _table(
            [
                "engine/pooling",
                "datasets",
                "groups x rows",
                "chains x iterations",
                "smallest p",
                "code",
            ],
            sbc_rows,
        )
    )
    _write(out / "benchmark_tables.rst", "\n".join(parts))
    _scaling_plot(scaling, out / "scaling.png")


def _scaling_plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for ax, axis, xlabel in zip(
        axes,
        ("rows", "groups"),
        ("rows (10 groups, 3 features)", "groups (20 rows each, 3 features)"),
        strict=True,
    ):
        sub = [r for r in rows if r["axis"] == axis]
        size = [r["size"] for r in sub]
        ax.loglog(size, [r["fit_s"] for r in sub], "o-", label="whole fit")
        ax.loglog(
            size, [max(r["sample_s"], 1e-3) for r in sub], "s--", label="sampling"
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    axes[0].set_title("time against rows")
    axes[1].set_title("time against groups")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
