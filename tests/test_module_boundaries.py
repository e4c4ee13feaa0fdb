"""The package's module boundaries, read from its syntax trees.

* No module of ``nnhandler/`` touches another module's private members: ``obj._name`` (or
  ``from .mod import _name``) where ``_name`` is defined only in *other* modules of the package.
  "Defined in a module" means: a function, class or module-/class-level name, an attribute
  assigned on ``self``/``cls``, or a ``__slots__`` entry there. ``self._x`` of a name the
  module defines is its own business; privates of other libraries (``torch._C``) are not ours
  to police here.
* The core (handler, loop, events, preemption) names no particular saver and no state-key
  prefix; the facade alone constructs the one ``AutoSaveCallback`` of ``auto_save`` (and keeps
  track of it).
* :class:`~nnhandler.NNHandler` satisfies the :class:`~nnhandler.Trainer` protocol.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from nnh_testing import make_handler

import nnhandler
from nnhandler import Callback, EmergencySaver, Trainer

PACKAGE = Path(nnhandler.__file__).resolve().parent


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _own_privates(tree: ast.Module) -> set[str]:
    """The private names a module defines (see the module docstring)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
        elif isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "__slots__"
                for target in node.targets):
            names.update(item.value for item in ast.walk(node.value)
                         if isinstance(item, ast.Constant) and isinstance(item.value, str))
    return {name for name in names if _is_private(name)}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_accesses(package: Path) -> list[str]:
    """``file:line attribute`` for each access of another module's private member."""
    trees = {path: _parse(path) for path in sorted(package.rglob("*.py"))}
    own = {path: _own_privates(tree) for path, tree in trees.items()}
    anywhere = set().union(*own.values())
    found = []
    for path, tree in trees.items():
        where = path.relative_to(package.parent).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                name = node.attr
                if _is_private(name) and name in anywhere and name not in own[path]:
                    found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (
                    node.level or (node.module or "").split(".")[0] == "nnhandler"):
                found.extend(f"{where}:{node.lineno} import {alias.name}"
                             for alias in node.names if _is_private(alias.name))
    return found


def test_no_module_touches_another_modules_private_members() -> None:
    offending = private_accesses(PACKAGE)
    assert offending == [], "\n".join(offending)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("class A:\n    def __init__(self):\n        self._x = 1\n", []),
        ("def f(handler):\n    return handler._x\n", ["pkg/b.py:2 handler._x"]),
        ("def f(handler):\n    handler._x = 2\n", ["pkg/b.py:2 handler._x"]),
        ("from .a import _helper\n", ["pkg/b.py:1 import _helper"]),
        ("import torch\nx = torch._C\n", []),
        ("class B:\n    def g(self):\n        return self._x\n", ["pkg/b.py:3 self._x"]),
    ],
    ids=["own-attribute", "foreign-read", "foreign-write", "private-import", "other-library",
         "inherited-private"],
)
def test_the_boundary_check_finds_what_it_should(tmp_path: Path, source: str,
                                                 expected: list[str]) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("def _helper():\n    return 1\n\n\nclass A:\n"
                                  "    def __init__(self):\n        self._x = 1\n")
    (package / "b.py").write_text(source)
    found = [line for line in private_accesses(package) if line.startswith("pkg/b.py")]
    assert found == expected


#: names that would special-case one saver in the core
SAVER_NAMES = frozenset({"AutoSaveCallback", "AUTOSAVE_KEY_PREFIX", "AUTOSAVE_CLAIM",
                         "AutoSaveConfig", "autosave"})


def _saver_names(path: Path, allowed_functions: frozenset[str] = frozenset(), *,
                 imports: bool = True) -> list[str]:
    """Identifiers, attributes, string prefixes and (with ``imports``) imported names from
    :data:`SAVER_NAMES` in ``path``, outside the functions named in ``allowed_functions``, as
    ``line name``."""
    tree = _parse(path)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                node.name in allowed_functions):
            skipped.update(id(inner) for inner in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and imports:
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names += node.module.split(".")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = ["autosave"] if node.value.startswith("autosave:") else []
        line = getattr(node, "lineno", 0)
        found += [f"{line} {name}" for name in names if name in SAVER_NAMES]
    return found


@pytest.mark.parametrize("module", ["loop.py", "events.py", "preemption.py"],
                         ids=["loop", "events", "preemption"])
def test_the_core_names_no_saver(module: str) -> None:
    assert _saver_names(PACKAGE / module) == []


def test_the_facade_names_the_auto_saver_only_for_auto_save() -> None:
    """``auto_save`` constructs (and reconfigures) the handler's one auto-saver,
    ``auto_save_callback`` returns it, ``load`` adopts it again from the file's record and
    ``__init__`` declares the attribute; nothing else in ``handler.py`` names a saver."""
    allowed = frozenset({"auto_save", "auto_save_callback", "_adopt_own_autosave", "__init__"})
    assert _saver_names(PACKAGE / "handler.py", allowed, imports=False) == []


def test_nnhandler_satisfies_the_trainer_protocol() -> None:
    handler = make_handler()
    assert isinstance(handler, Trainer)
    trainer: Trainer = handler  # and statically (mypy checks the tests' types too)
    assert trainer.checkpoints is handler.checkpoints
    assert trainer.state_registry is handler.state_registry
    assert trainer.last_logs == {} and trainer.epoch == 0 and trainer.global_step == 0


def test_an_object_without_the_seam_is_no_trainer() -> None:
    class Partial:
        epoch = 0
        global_step = 0

    assert not isinstance(Partial(), Trainer)


def test_the_auto_saver_is_an_emergency_saver_and_plain_callbacks_are_not() -> None:
    handler = make_handler()
    saver = handler.auto_save(1, "ck", save_on_signal=True)
    assert isinstance(saver, EmergencySaver)
    assert not isinstance(Callback(), EmergencySaver)


#: issue 12: "no module of nnhandler/ over 600 lines" — a contributor finds where to change X
#: from the file names, and no module grows back into a second facade
MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines() -> None:
    sizes = {path.relative_to(PACKAGE.parent).as_posix():
             len(path.read_text(encoding="utf-8").splitlines())
             for path in sorted(PACKAGE.rglob("*.py"))}
    too_long = {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert too_long == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {too_long}"
