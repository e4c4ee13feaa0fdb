"""Sphinx configuration of the nnhandler documentation site.

Build it with ``nox -s docs`` (warnings are errors), or by hand::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from docutils.nodes import Element, TextElement
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

ROOT = Path(__file__).resolve().parents[1]
# the checkout's own packages, also where they are not installed (the plugin is a separate one)
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "nnhandler-sde" / "src")]

import nnhandler  # noqa: E402

project = "nnhandler"
author = "the nnhandler developers"
release = version = nnhandler.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: ``[text](page.md#a-heading)`` links resolve (pages are also read on GitHub)
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# API reference: Google-style docstrings with Sphinx roles
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

# Nitpicky (-n): every cross-reference must resolve. Names from other projects cannot: the
# build has no network for intersphinx inventories, so those targets are listed here.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pydantic|numpy|matplotlib|typing_extensions|nn)(\..*)?"),
    (r"py:.*", r"(pathlib|typing|collections|contextlib|os|enum|logging|threading|types|"
               r"signal|argparse|dataclasses|abc|concurrent|importlib|io|re)\..*"),
    # internal types and modules that public signatures and docstrings name; they are not
    # part of the reference (render as plain names)
    (r"py:.*", r"(nnhandler\.)?(run_setup\.Unset|config\.(Parallelism|AutoSaveConfig)|"
               r"checkpoint\..*|naming\..*|events\.EventDispatcher|preemption|"
               r"callbacks\.autosave_options\._Option|ziplayout|\.checkpoint\.retention)"),
    (r"py:class", r"Unset|Parallelism|ShardedComponents|EventDispatcher|AutoSaveStateRecord|"
                  r"MidEpoch"),  # nnhandler.loop.MidEpoch: on_train_step_end's mid_epoch
    (r"py:class", r"Path|AbstractContextManager"),  # pathlib, contextlib (see above)
    (r"py:class", r"URL"),  # nnhandler.checkpoint.storage.URL where a hint stays a string
    (r"py:func", r"local_cuda_index"),
]
# short or private names that signatures use for public types
ALIASES = {
    "_LoggingMode": "nnhandler.LoggingMode",
    "AutoSaveOptions": "nnhandler.callbacks.AutoSaveOptions",
    "Progress": "nnhandler.components.history.Progress",
    "DistributedContext": "nnhandler.distributed.DistributedContext",
}

html_theme = "furo"
html_title = f"nnhandler {release}"


def _public_name(target: str) -> str | None:
    """``nnhandler.callbacks.AutoSaveCallback.flush`` -> ``nnhandler.AutoSaveCallback.flush``:
    the name under which the API reference documents the object a module path reaches (the
    docstrings name objects by their defining module as well as by their public name)."""
    if not target.startswith("nnhandler.") or target.count(".") < 2:
        return None
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for i, part in enumerate(parts[split:]):
            if not hasattr(obj, part):
                return None
            obj = getattr(obj, part)
            for public in nnhandler.__all__:
                if getattr(nnhandler, public) is obj and (split + i) > 1:
                    return ".".join(["nnhandler", public, *parts[split + i + 1:]])
        return None
    return None


def _resolve_alias(app: Sphinx, env: BuildEnvironment, node: pending_xref,
                   contnode: TextElement) -> Element | None:
    """A reference our docstrings write by a defining module's path, a short name or relative
    to the documented class, resolved to where the reference documents that object."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    candidates = [ALIASES.get(target, target)]
    module, cls = node.get("py:module"), node.get("py:class")
    if module and cls:
        candidates.append(f"{module}.{cls}.{target}")
    if module:
        candidates.append(f"{module}.{target}")
        if cls:  # the module that defines the documented class (nnhandler.RestoreResult: state)
            defining = getattr(getattr(importlib.import_module(module), cls.split(".")[0], None),
                               "__module__", None)
            if defining:
                candidates.append(f"{defining}.{target}")
    candidates.append(f"nnhandler.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        for name in (_public_name(candidate), candidate):
            if name is None or name == node["reftarget"]:
                continue
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                        name, node, contnode)
            if found is not None:
                return found
    return None


def _pydantic_signature(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                        signature: str | None,
                        return_annotation: str | None) -> tuple[str, None] | None:
    """A pydantic model's generated signature spells each field's constraints as reprs
    (``Annotated[int, FieldInfo(...)]``); show the keyword names and defaults, the docstring
    says the rules."""
    from pydantic import BaseModel

    if what != "class" or not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        return None
    fields = [f"{field}={info.default!r}" if not info.is_required() else field
              for field, info in obj.model_fields.items()]
    return f"(*, {', '.join(fields)})", None


def _drop_pydantic_typehints(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                             signature: str | None, return_annotation: str | None) -> None:
    """The same for the parameter types ``autodoc_typehints = "description"`` would list."""
    from pydantic import BaseModel

    if isinstance(obj, type) and issubclass(obj, BaseModel):
        app.env.current_document.autodoc_annotations.pop(name, None)


def setup(app: Sphinx) -> None:
    app.connect("missing-reference", _resolve_alias)
    app.connect("autodoc-process-signature", _pydantic_signature)
    app.connect("autodoc-process-signature", _drop_pydantic_typehints, priority=900)
    # Napoleon reads an attribute's or property's first line as ``type: description``; our
    # types come from the annotations and such a first line ("Training defaults: ...") is
    # prose, so napoleon leaves attribute and property docstrings alone.
    from sphinx.ext.napoleon import _process_docstring

    listeners = app.events.listeners["autodoc-process-docstring"]
    for listener in list(listeners):
        if listener.handler is _process_docstring:
            listeners.remove(listener)

    def google_style(app: Sphinx, what: Any, name: str, obj: Any, options: Any,
                     lines: list[str]) -> None:
        if what not in ("attribute", "property", "data"):
            _process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", google_style)
