"""Developer sessions. They run in the current environment (``python=False``): PyTorch builds
are large and machine-specific, so nox does not install a fresh one per session. Set up once with
``pip install -e ".[dev]" -e plugins/nnhandler-sde`` (see README)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, property, multi-process DDP, examples)."""
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "nnhandler", "tests", "examples", "benchmarks", "plugins",
                "noxfile.py")


@nox.session(python=False)
def typecheck(session: nox.Session) -> None:
    session.run("mypy")


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    """The quickstart: train with auto-save, then resume from a checkpoint."""
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """The benchmark suite: ratios against plain PyTorch, side by side (see benchmarks/)."""
    session.run("python", "-m", "benchmarks", *session.posargs)
