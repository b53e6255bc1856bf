"""Sphinx configuration of the hiermask documentation.

Build (from the repository root)::

    pip install -e ".[docs]"
    HIERMASK_DOCS_FAST=1 sphinx-build -W --keep-going -b html docs docs/_build/html

``HIERMASK_DOCS_FAST=1`` runs the gallery scripts and the command-line session
with small sampler settings (``_generate.sampler_args``); without it they run
with their own defaults. ``-D plot_gallery=0`` skips running the gallery.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import _generate  # noqa: E402  (docs/_generate.py, next to this file)

import hiermask  # noqa: E402

project = "hiermask"
author = "the hiermask developers"
copyright = "2026, the hiermask developers"
release = hiermask.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated", "**.ipynb_checkpoints"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_default_options = {"member-order": "bysource"}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# An undocumented or misspelled parameter, a public name without a docstring
# or without an Examples section is a warning, so ``-W`` fails the build (the
# datasets' constants are data, without examples).
numpydoc_validation_checks = {"GL08", "PR01", "PR02", "PR07", "EX01"}
numpydoc_validation_exclude = {r"\._[a-z]", r"\.__", r"\.MANUFACTURING_"}

html_theme = "pydata_sphinx_theme"
html_title = f"hiermask {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    # The wide tables of these pages get the whole width.
    "secondary_sidebar_items": {
        "**": ["page-toc"],
        "benchmarks": [],
        "comparison": [],
    },
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "light"}
html_sidebars = {"benchmarks": [], "comparison": []}
html_show_sourcelink = False


sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # run every script
    "reset_argv": "_generate.gallery_argv",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
}


def setup(app):
    """Write the generated pages before Sphinx reads the sources."""
    out = DOCS / "_generated"
    _generate.cli_reference(out)
    _generate.benchmark_pages(out, ROOT / "benchmarks" / "results")
    _generate.cli_session(out, _generate.sampler_args())
