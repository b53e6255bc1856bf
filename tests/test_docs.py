"""Every Python code block of the README and of the user guide runs (issue 18).

The blocks of one file run in order in one namespace, as a reader would paste
them, with the estimator's sampler defaults lowered to small settings.
"""

import re
import textwrap
import warnings
from pathlib import Path

import pytest
from sklearn.exceptions import ConvergenceWarning

from hiermask import MaskedHierarchicalRegressor

from .conftest import FAST

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def markdown_blocks(text):
    """The fenced ```python blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def rst_blocks(text):
    """The ``.. code-block:: python`` blocks of a reStructuredText text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if re.match(r"^\s*\.\. code-block:: python\s*$", lines[i]):
            indent = len(lines[i]) - len(lines[i].lstrip())
            i += 1
            while i < len(lines) and re.match(r"^\s+:\w", lines[i]):  # options
                i += 1
            body = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
        else:
            i += 1
    return blocks


def test_block_extraction():
    rst = (
        "Text\n\n.. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = 2\nback\n"
    )
    assert rst_blocks(rst) == ["a = 1\n\nb = 2\n"]
    assert markdown_blocks("x\n```python\nc = 3\n```\n```bash\nls\n```\n") == [
        "c = 3\n"
    ]


@pytest.fixture
def small_sampler(monkeypatch):
    """New estimators default to FAST's sampler settings."""
    defaults = MaskedHierarchicalRegressor.__init__.__kwdefaults__
    for name in ("num_warmup", "num_samples", "num_chains"):
        monkeypatch.setitem(defaults, name, FAST[name])
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _run(blocks, name):
    assert blocks, f"no Python code block in {name}"
    namespace = {"__name__": f"docs_{name}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for number, block in enumerate(blocks):
            code = compile(block, f"<{name} block {number}>", "exec")
            exec(code, namespace)
    return namespace


@pytest.mark.usefixtures("small_sampler")
def test_readme_code_blocks_run():
    namespace = _run(markdown_blocks((ROOT / "README.md").read_text()), "README")
    assert not namespace["est"].mask_.loc["Product_Group_1", "Cutting_Wait_Time"]


@pytest.mark.usefixtures("small_sampler")
@pytest.mark.parametrize("page", ["getting_started.rst", "user_guide.rst"])
def test_docs_code_blocks_run(page):
    namespace = _run(rst_blocks((DOCS / page).read_text()), page)
    assert namespace["est"].num_warmup == FAST["num_warmup"]
