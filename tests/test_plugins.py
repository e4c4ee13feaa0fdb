"""Plugin discovery through the entry-point group ``nnhandler.plugins``: a real dist-info
directory on ``sys.path`` (as pip writes one), the example plugin of docs/plugins.md taken
verbatim from its "Writing a plugin" steps, and ``NNHandler.load`` re-creating the plugin's
state provider from a checkpoint."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nnh_testing import attach_loaders, make_handler, write_dist_info

import nnhandler
from nnhandler import NNHandler, PluginError, PluginRegistry, discover_plugins

PLUGINS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def readme_plugin_source() -> str:
    """The plugin module of docs/plugins.md, "Writing a plugin" steps 2 and 3, verbatim."""
    text = PLUGINS_PAGE.read_text(encoding="utf-8")
    blocks = [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", text,
                                                              re.DOTALL)]
    (callback,) = [b for b in blocks if b.startswith("# src/epoch_counter/__init__.py")]
    (register,) = [b for b in blocks if b.startswith("def make(state_key, state):")]
    return callback + "\n\n" + register


def readme_entry_point() -> dict[str, str]:
    """The step 4 entry point of docs/plugins.md: ``{name: "module:function"}``."""
    text = PLUGINS_PAGE.read_text(encoding="utf-8")
    match = re.search(r'\[project.entry-points."nnhandler.plugins"\]\n\s*(\w+) = "([\w.:]+)"',
                      text)
    assert match is not None, "docs/plugins.md step 4 lost its entry point"
    return {match.group(1): match.group(2)}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` for plugin modules and dist-info records; the modules
    imported from it are forgotten afterwards."""
    directory = tmp_path / "site"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    before = set(sys.modules)
    yield directory
    for name in set(sys.modules) - before:
        if name.startswith(("plugin_", "epoch_counter")):
            del sys.modules[name]
    importlib.invalidate_caches()


def install(site: Path, module: str, source: str, entry_points: dict[str, str],
            version: str = "0.0.0") -> None:
    (site / f"{module}.py").write_text(source)
    write_dist_info(site, module.replace("_", "-"), entry_points, version=version)
    importlib.invalidate_caches()


@pytest.fixture
def counter_plugin(site: Path) -> Path:
    """The example plugin of docs/plugins.md, installed as its steps say (module, entry point)."""
    install(site, "epoch_counter", readme_plugin_source(), readme_entry_point(), version="0.1.0")
    return site


def counter_checkpoint(path: str, *names: str | None) -> None:
    """Train 2 epochs with the plugin's callbacks attached by hand, and save."""
    module = importlib.import_module("epoch_counter")
    handler = make_handler()
    for name in names:
        handler.add_callback(module.EpochCounter(name))
    handler.train(2, seed=0, progress_bar=False)
    handler.save(path)


def counters(handler: NNHandler) -> dict[str, int]:
    return {cb.state_key: cb.count for cb in handler.callbacks if hasattr(cb, "count")}


def test_discovery_finds_the_entry_point_and_runs_register(counter_plugin: Path) -> None:
    registry = discover_plugins()
    assert "epoch_counter" in registry.keys
    (counter,) = [name for name in registry.plugins if name.startswith("epoch_counter ")]
    assert counter == "epoch_counter (epoch_counter:register from epoch-counter 0.1.0)"
    assert registry.claim_for("epoch_counter:a") is not None
    assert registry.claim_for("epoch_counterx") is None


def test_load_recreates_the_plugins_providers_with_their_state(counter_plugin: Path) -> None:
    counter_checkpoint("ck.pth", None, "val")
    loaded = NNHandler.load("ck.pth")  # no callbacks passed
    assert counters(loaded) == {"epoch_counter": 2, "epoch_counter:val": 2}
    attach_loaders(loaded)
    loaded.train(1, seed=0, progress_bar=False)
    assert counters(loaded) == {"epoch_counter": 3, "epoch_counter:val": 3}
    loaded.save("ck3.pth")
    assert counters(NNHandler.load("ck3.pth")) == {"epoch_counter": 3, "epoch_counter:val": 3}


def test_a_passed_callback_takes_the_state_instead(counter_plugin: Path) -> None:
    counter_checkpoint("ck.pth", None)
    mine = importlib.import_module("epoch_counter").EpochCounter()
    loaded = NNHandler.load("ck.pth", callbacks=[mine])
    assert [cb for cb in loaded.callbacks if hasattr(cb, "count")] == [mine]
    assert mine.count == 2


def test_skip_callbacks_does_not_recreate(counter_plugin: Path) -> None:
    counter_checkpoint("ck.pth", None)
    assert counters(NNHandler.load("ck.pth", skip_callbacks=True)) == {}


def test_checkpoints_without_foreign_state_never_import_plugins(site: Path) -> None:
    install(site, "plugin_broken", "raise ImportError('the plugin is broken')",
            {"broken": "plugin_broken:register"})
    make_handler().save("plain.pth")
    NNHandler.load("plain.pth")  # all state owned: plugins are not consulted
    assert "plugin_broken" not in sys.modules


@pytest.mark.parametrize(
    ("source", "target", "match"),
    [
        ("raise ImportError('no such thing')", "plugin_bad:register",
         r"plugin bad \(plugin_bad:register from plugin-bad 0\.0\.0\) cannot be imported: "
         "ImportError: no such thing"),
        ("register = 42", "plugin_bad:register", "must point to a function register"),
        ("def register(registry):\n    raise RuntimeError('boom')\n", "plugin_bad:register",
         r"plugin bad .*register\(\) raised RuntimeError: boom"),
        ("def register(registry):\n    registry.add_state_provider('a:b', print)\n",
         "plugin_bad:register", "must be a non-empty str without ':'"),
        ("def register(registry):\n    registry.add_state_provider('k', 3)\n",
         "plugin_bad:register", "factory for 'k' is not callable"),
    ],
    ids=["import-error", "not-callable", "register-raises", "bad-key", "bad-factory"],
)
def test_a_broken_plugin_is_an_error_naming_it(site: Path, source: str, target: str,
                                               match: str) -> None:
    install(site, "plugin_bad", source, {"bad": target})
    with pytest.raises(PluginError, match=match):
        discover_plugins()


def test_a_broken_plugin_fails_a_load_that_needs_plugins(counter_plugin: Path) -> None:
    counter_checkpoint("ck.pth", None)
    install(counter_plugin, "plugin_bad", "raise ImportError('gone')", {"bad": "plugin_bad:x"})
    with pytest.raises(PluginError, match=r"plugin bad .* cannot be imported"):
        NNHandler.load("ck.pth")


def test_two_plugins_claiming_one_key_is_an_error(counter_plugin: Path) -> None:
    install(counter_plugin, "plugin_twin", readme_plugin_source(),
            {"twin": "plugin_twin:register"})
    with pytest.raises(PluginError, match=r"plugins epoch_counter .* and twin .* both claim the "
                                          "state key 'epoch_counter'"):
        discover_plugins()


def test_a_factory_that_fails_or_returns_the_wrong_provider_is_an_error() -> None:
    registry = PluginRegistry()

    def failing(state_key: str, state: Any) -> Any:
        raise KeyError("count")

    registry.run("failing", lambda r: r.add_state_provider("a", failing))
    registry.run("wrong", lambda r: r.add_state_provider(
        "b", lambda key, state: importlib.import_module("nnhandler").CSVLogger("x.csv")))
    with pytest.raises(PluginError, match=r"plugin failing failed to re-create .* 'a:1'"):
        registry.create_provider("a:1", {})
    with pytest.raises(PluginError, match="expected a StateProvider whose state_key is 'b'"):
        registry.create_provider("b", {})
    assert registry.create_provider("c", {}) is None


def test_the_core_never_names_a_plugin() -> None:
    core = Path(nnhandler.__file__).parent
    for source in core.rglob("*.py"):
        assert "nnhandler_sde" not in source.read_text(), source
