"""handler.plot_losses / plot_metrics (PNG, optional matplotlib) and handler.export (plain
weights that plain torch loads into the user's own model, without nnhandler)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from nnh_testing import BatchNormNet, TinyNet, make_handler

from nnhandler import ConfigurationError, MissingDependencyError, NNHandler
from nnhandler.checkpoint import TEMP_INFIX

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hide_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``import name`` fail as if the package were not installed (a ``None`` entry in
    ``sys.modules`` is how Python marks a module as unimportable)."""
    for loaded in list(sys.modules):
        if any(loaded == name or loaded.startswith(f"{name}.") for name in names):
            monkeypatch.delitem(sys.modules, loaded)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# -- plots -------------------------------------------------------------------------------------
@pytest.fixture
def trained() -> NNHandler:
    handler = make_handler()
    handler.train(4, seed=0, validate_every=2, progress_bar=False)
    return handler


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_losses_draws_train_and_validation_loss_per_epoch(trained: NNHandler) -> None:
    pytest.importorskip("matplotlib")
    from nnhandler.plotting import build_figure

    path = trained.plot_losses("plots/losses.png")
    assert path == Path("plots/losses.png")
    width, height = png_size(path)
    assert width > 100 and height > 100
    (axis,) = build_figure(trained.history, ["loss"]).axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in axis.get_lines()}
    assert lines == {"train": ([1, 2, 3, 4], trained.train_losses),
                     "validation": ([2, 4], trained.val_losses)}
    assert not [p for p in Path("plots").iterdir() if TEMP_INFIX in p.name]


def test_plot_metrics_has_one_panel_per_metric(trained: NNHandler) -> None:
    pytest.importorskip("matplotlib")
    from nnhandler.plotting import build_figure

    one = png_size(trained.plot_metrics("mae.png"))
    two = png_size(trained.plot_metrics("twice.png", names=["mae", "mae"]))
    assert two[0] == one[0] and two[1] > 1.8 * one[1]
    (axis,) = build_figure(trained.history, ["mae"]).axes
    train_line, val_line = axis.get_lines()
    assert list(train_line.get_ydata()) == trained.train_metrics_history["mae"]
    assert list(val_line.get_ydata()) == trained.val_metrics_history["mae"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda h: h.plot_losses("losses.pdf"), r"must end in \.png"),
        (lambda h: h.plot_metrics("m.png", names=["accuracy"]), r"\['accuracy'\] not in"),
        (lambda h: h.plot_metrics("m.png", names=[]), "not in the history"),
    ],
    ids=["not-png", "unknown-metric", "no-names"],
)
def test_bad_plot_requests_are_configuration_errors(
    trained: NNHandler, call: Callable[[NNHandler], object], match: str,
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call(trained)


def test_plotting_before_training_or_without_metrics_says_so() -> None:
    handler = make_handler(metric=False)
    with pytest.raises(ConfigurationError, match="train first"):
        handler.plot_losses("l.png")
    handler.train(1, seed=0, progress_bar=False)
    with pytest.raises(ConfigurationError, match="holds no metric"):
        handler.plot_metrics("m.png")


def test_missing_matplotlib_names_the_extra(trained: NNHandler,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    hide_modules(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError,
                       match=r"pip install nnhandler\[plot\]") as raised:
        trained.plot_losses("l.png")
    assert isinstance(raised.value, ImportError)
    assert not Path("l.png").exists()


# -- export ------------------------------------------------------------------------------------
USER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn

    class MyNet(nn.Module):  # the user's own copy of the architecture
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

    model = MyNet()
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True))  # strict
    model.eval()
    torch.save(model(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])
    assert not any(name.split(".")[0] == "nnhandler" for name in sys.modules), "imported nnhandler"
""")


def run_user_script(weights: Path, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``weights`` into a model of the user's own in a process without nnhandler; the
    model's output there and the inputs it was given."""
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, str(script), str(weights), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120, env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    return torch.load(tmp_path / "out.pt", weights_only=True), inputs


@pytest.mark.slow
def test_exported_weights_load_into_the_users_own_model_without_nnhandler(tmp_path: Path) -> None:
    handler = make_handler()
    handler.train(2, seed=0, progress_bar=False)
    path = handler.export(tmp_path / "export" / "weights.pt")
    output, inputs = run_user_script(path, tmp_path)
    handler.module.eval()
    with torch.no_grad():
        assert torch.equal(output, handler.module(inputs))


@pytest.mark.slow
def test_ema_export_holds_the_averaged_weights_under_the_plain_names(tmp_path: Path) -> None:
    handler = make_handler()
    handler.train(3, seed=0, ema_decay=0.9, progress_bar=False)
    ema = torch.load(handler.export("ema.pt", ema=True), weights_only=True)
    raw = torch.load(handler.export("raw.pt"), weights_only=True)
    assert ema.keys() == raw.keys() == handler.module.state_dict().keys()
    assert "n_averaged" in handler.ema_model.state_dict()  # type: ignore[union-attr]
    averaged = handler.ema_model.module.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(ema[k], averaged[k]) for k in ema)
    assert not all(torch.equal(ema[k], raw[k]) for k in ema)
    output, inputs = run_user_script(Path("ema.pt").resolve(), tmp_path)
    averaged_module = handler.ema_model.module.eval()  # type: ignore[union-attr]
    with torch.no_grad():
        assert torch.equal(output, averaged_module(inputs))


def test_export_includes_buffers_and_is_on_the_cpu() -> None:
    handler = make_handler(model_class=BatchNormNet)
    handler.train(1, seed=0, progress_bar=False)
    weights = torch.load(handler.export("bn.pt"), weights_only=True)
    assert {"net.1.running_mean", "net.1.num_batches_tracked"} <= weights.keys()
    assert all(t.device.type == "cpu" for t in weights.values())


def test_export_strips_the_compile_wrapper() -> None:
    handler = NNHandler(TinyNet, device="cpu", compile_model=True)
    assert all(k.startswith("_orig_mod.") for k in handler.model.state_dict())
    weights = torch.load(handler.export("compiled.pt"), weights_only=True)
    assert weights.keys() == TinyNet().state_dict().keys()


def test_export_ema_without_an_ema_is_an_error() -> None:
    handler = make_handler()
    with pytest.raises(ConfigurationError, match=r"no EMA model.*ema_decay > 0"):
        handler.export("ema.pt", ema=True)
    assert not Path("ema.pt").exists()


def test_export_replaces_an_existing_file_atomically_and_refuses_a_directory() -> None:
    handler = make_handler()
    Path("weights.pt").write_bytes(b"old")
    handler.export("weights.pt")
    assert set(torch.load("weights.pt", weights_only=True)) == set(handler.module.state_dict())
    assert [p.name for p in Path(".").iterdir() if TEMP_INFIX in p.name] == []
    Path("folder").mkdir()
    with pytest.raises(ConfigurationError, match="is a directory"):
        handler.export("folder")
