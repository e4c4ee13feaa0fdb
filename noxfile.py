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
def quick(session: nox.Session) -> None:
    """The quick subset (about a minute on 2 cores): every module's fast tests, without the
    multi-process torch.distributed runs and the tests marked slow. CI runs ``tests``."""
    session.run("python", "-m", "pytest", "-q", "-m", "not slow and not distributed",
                *session.posargs)


#: the tests of writing and reading checkpoints (~1 min): run again with the torch.save writer
CHECKPOINT_TESTS = (
    "tests/test_writer_seam.py", "tests/test_write_path.py", "tests/test_integrity.py",
    "tests/test_zip_layout.py", "tests/test_async_save.py", "tests/test_crafted_files.py",
    "tests/test_disk_errors.py", "tests/test_checkpointing_seam.py", "tests/test_mapped_read.py",
)


@nox.session(python=False)
def tests_torch_writer(session: nox.Session) -> None:
    """The checkpoint tests with ``NNHANDLER_WRITER=torch``: every file written by torch.save
    (the fallback where the fast writer's self-check fails). Same list as ``.ci/run``."""
    session.run("python", "-m", "pytest", "-q", *CHECKPOINT_TESTS, *session.posargs,
                env={"NNHANDLER_WRITER": "torch"})


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "nnhandler", "tests", "examples", "benchmarks", "plugins",
                "noxfile.py")


@nox.session(python=False)
def typecheck(session: nox.Session) -> None:
    session.run("mypy")


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """The documentation site, every warning an error and every reference resolved
    (``-W -n``), into docs/_build/html (the ``docs`` extra, part of ``dev``)."""
    session.run("python", "-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", "docs",
                "docs/_build/html", *session.posargs)


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    """The quickstart: train with auto-save, then resume from a checkpoint."""
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """The benchmark suite: ratios against plain PyTorch, side by side (see benchmarks/)."""
    session.run("python", "-m", "benchmarks", *session.posargs)
