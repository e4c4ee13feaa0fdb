"""What the base install (``pip install nnhandler``, no extras) must give a newcomer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
            for requirement in requirements}


def test_numpy_is_a_base_dependency() -> None:
    """Without NumPy, ``import torch`` itself warns ``Failed to initialize NumPy`` (torch
    2.13, in ``torch/_subclasses/functional_tensor.py``), so every script would print it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "numpy" in _requirement_names(project["dependencies"])
    assert "numpy" not in _requirement_names(project["optional-dependencies"]["dev"])


def test_importing_torch_and_nnhandler_emits_no_user_warning() -> None:
    completed = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", "import torch, nnhandler"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Warning" not in completed.stderr, completed.stderr
