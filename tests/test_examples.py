"""Every ```python example of README.md, and the package docstring's, runs
as written, in a fresh interpreter, and cleans up after itself: exit status
0 and nothing at all on stderr (no traceback, no warning such as a leaked
shared memory segment)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import parallel_save as ps

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)
# The package's own docstring example: the indented block after "Example ...::".
EXAMPLES.append(textwrap.dedent(re.search(r"::\n\n((?:    .*\n|\n)+)",
                                          ps.__doc__).group(1)))


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 3  # the API, live saving, checkpoints


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i + 1}" for i in range(len(EXAMPLES))])
def test_readme_example_runs_cleanly(code, tmp_path):
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "example.py"],
                          cwd=tmp_path, check=False, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
