"""Coming from the original NNHandler (docs/migration.md): its constructor's names mapped or
refused, near misses of ours refused, ``handler(x)`` / ``handler.eval()``, the plots' original
signature, and seeded model construction."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import TinyNet, make_handler, regression_dataset
from torch import nn

from nnhandler import ConfigurationError, NNHandler
from nnhandler.compat import ModelType

ROOT = Path(__file__).resolve().parents[1]


class OpenNet(nn.Module):
    """A model that takes ``**kwargs``: it declares no name, so it accepts every one."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options
        self.layer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TypedNet(TinyNet):
    """A model whose own parameters are named like the original handler's and like a near
    miss of ours: they are the model's."""

    def __init__(self, model_type: str = "mine", seeds: int = 0) -> None:
        super().__init__()
        self.model_type, self.seeds = model_type, seeds


def weights(handler: NNHandler) -> list[torch.Tensor]:
    return [p.detach().clone() for p in handler.module.parameters()]


# -- seeded construction -------------------------------------------------------------------------
def test_seed_builds_identical_weights_and_leaves_the_callers_streams_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = NNHandler(TinyNet, device="cpu", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream did not move
    torch.manual_seed(999)  # whatever the global state, the seed decides
    second = NNHandler(TinyNet, device="cpu", seed=7)
    other = NNHandler(TinyNet, device="cpu", seed=8)
    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(second), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(first), weights(other), strict=True))


def test_seeded_weights_are_the_same_in_another_process(tmp_path: Path) -> None:
    script = ("import torch; from nnh_testing import TinyNet; from nnhandler import NNHandler; "
              "h = NNHandler(TinyNet, device='cpu', seed=7, logger_mode='file', "
              "log_file='n.log'); torch.save(h.module.state_dict(), 'w.pt')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True,
                   timeout=120, capture_output=True)
    theirs = torch.load(tmp_path / "w.pt", weights_only=True)
    ours = NNHandler(TinyNet, device="cpu", seed=7).module.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[key], ours[key]) for key in ours)


@pytest.mark.parametrize(("call_seed", "used"), [(None, 5), (11, 11)],
                         ids=["constructor-seed", "train-seed-overrides"])
def test_constructor_seed_is_trains_default(call_seed: int | None, used: int) -> None:
    seeded = NNHandler(TinyNet, device="cpu", seed=5)
    assert seeded.settings.seed == 5
    seeded.set_optimizer(torch.optim.SGD, lr=0.01)
    seeded.set_loss_fn(nn.MSELoss)
    seeded.set_train_loader(regression_dataset(), batch_size=8, shuffle=True)
    if call_seed is None:
        seeded.train(1, progress_bar=False)
    else:
        seeded.train(1, seed=call_seed, progress_bar=False)
    assert seeded.progress.run_seed == used
    assert seeded.state_dict()["config"]["train_settings"]["seed"] == used


@pytest.mark.parametrize("seed", [-1, "0", 1.5, True], ids=["negative", "str", "float", "bool"])
def test_a_bad_seed_is_refused_before_anything_is_built(seed: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"NNHandler\(seed="):
        NNHandler(TinyNet, device="cpu", seed=seed)


# -- the original constructor's names -------------------------------------------------------------
def test_the_original_notebooks_constructor_call_works_with_deprecation_warnings(
    tmp_path: Path,
) -> None:
    log = tmp_path / "models" / "training.log"
    with pytest.warns(DeprecationWarning) as caught:
        handler = NNHandler(TinyNet, model_type=ModelType.CLASSIFICATION, device="cpu",
                            logger_mode=NNHandler.LoggingMode.FILE, logger_filename=str(log),
                            logger_level=logging.DEBUG, save_model_code=False)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any("logger_filename" in m and "log_file=" in m for m in messages)
    assert any("model_type=ModelType.CLASSIFICATION" in m and "ignored" in m for m in messages)
    assert any("logger_level" in m and "setLevel" in m for m in messages)
    assert any("save_model_code=False" in m for m in messages)
    assert all(Path(w.filename) == Path(__file__) for w in caught)  # points at the call
    assert handler.logger.level == logging.DEBUG
    handler.logger.debug("a debug line")
    assert "a debug line" in log.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("value", "note"),
    [("score_based", "nnhandler-sde plugin"), ("REGRESSION", "drop the argument"),
     (ModelType.GENERATIVE, "drop the argument")],
    ids=["score-based-str", "upper-case-str", "member"],
)
def test_model_type_is_accepted_and_deprecated(value: Any, note: str) -> None:
    with pytest.warns(DeprecationWarning, match=note):
        NNHandler(TinyNet, device="cpu", model_type=value)


@pytest.mark.parametrize(
    ("keywords", "pattern"),
    [
        ({"save_model_code": True}, r"save_model_code=True\) is not supported.*import path"),
        ({"ddp_kwargs": {"find_unused_parameters": True}}, r"ddp_kwargs=.*not supported"),
        ({"logger_filemode": "w"}, r"logger_filemode='w'\) is not supported"),
        ({"model_type": "vision"}, r"model_type='vision'\): not a model type"),
        ({"model_type": 3}, r"model_type=3\): not a model type"),
        ({"logger_level": "LOUD"}, r"logger_level='LOUD'\): not a logging level"),
        ({"logger_level": True}, r"logger_level=True\): not a logging level"),
        ({"logger_filename": 5}, r"logger_filename=5\) must be a path"),
        ({"logger_filename": "a.log", "log_file": "b.log"}, r"two log files"),
    ],
    ids=["save-code", "ddp-kwargs", "filemode-w", "model-type-str", "model-type-int",
         "level-name", "level-bool", "filename-int", "two-log-files"],
)
def test_original_names_without_a_mapping_are_configuration_errors(
    keywords: dict[str, Any], pattern: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigurationError, match=pattern):
            NNHandler(TinyNet, device="cpu", **keywords)


@pytest.mark.parametrize(
    ("typo", "ours"),
    [("devcie", "device"), ("logger_file", "log_file"), ("use_distribute", "use_distributed"),
     ("compile_modle", "compile_model"), ("model_kwarg", "model_kwargs"), ("seeds", "seed")],
    ids=["devcie", "logger_file", "use_distribute", "compile_modle", "model_kwarg", "seeds"],
)
def test_a_near_miss_of_our_keyword_says_did_you_mean(typo: str, ours: str) -> None:
    with pytest.raises(ConfigurationError,
                       match=rf"'{typo}' is not an argument of NNHandler \(did you mean {ours}=\?\)"
                             rf" nor a parameter of TinyNet.*model_kwargs="):
        NNHandler(TinyNet, device="cpu", **{typo: 1})


_OWN = sorted(name for name, p in inspect.signature(NNHandler.__init__).parameters.items()
              if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(_OWN), data=st.data())
def test_every_one_letter_slip_of_our_keywords_is_caught(name: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(name) - 1))
    slip = data.draw(st.sampled_from(["drop", "double", "swap"]))
    if slip == "drop":
        typo = name[:index] + name[index + 1:]
    elif slip == "double":
        typo = name[:index] + name[index] + name[index:]
    else:
        index = min(index, len(name) - 2)
        typo = name[:index] + name[index + 1] + name[index] + name[index + 2:]
    if typo in _OWN or typo in ("hidden", "dropout") or not typo.isidentifier():
        return  # not a slip (the same or another valid name)
    with pytest.raises(ConfigurationError, match="did you mean"):
        NNHandler(TinyNet, device="cpu", **{typo: 1})


def test_keywords_the_model_declares_still_go_to_the_model() -> None:
    handler = NNHandler(TypedNet, device="cpu", model_type="custom", seeds=3)
    assert isinstance(handler.module, TypedNet)
    assert (handler.module.model_type, handler.module.seeds) == ("custom", 3)
    plain = NNHandler(TinyNet, device="cpu", hidden=5)  # the seed's hidden=64 style
    assert plain.module.net[0].out_features == 5


def test_a_kwargs_model_gets_its_arguments_but_not_the_handlers_names() -> None:
    handler = NNHandler(OpenNet, device="cpu", width=3, depth=2)
    assert isinstance(handler.module, OpenNet)
    assert handler.module.options == {"width": 3, "depth": 2}
    with pytest.warns(DeprecationWarning, match="logger_level"):
        second = NNHandler(OpenNet, device="cpu", logger_level=logging.WARNING)
    assert isinstance(second.module, OpenNet) and second.module.options == {}
    with pytest.raises(ConfigurationError, match="did you mean device="):
        NNHandler(OpenNet, device="cpu", devce="x")
    third = NNHandler(OpenNet, device="cpu", model_kwargs={"devce": "x"})  # on purpose
    assert isinstance(third.module, OpenNet) and third.module.options == {"devce": "x"}


def test_an_unknown_keyword_is_still_the_models_own_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        NNHandler(TinyNet, device="cpu", colour="red")


# -- handler(x), eval() ---------------------------------------------------------------------------
def test_calling_the_handler_is_the_models_forward_and_eval_switches_modes() -> None:
    handler = make_handler()
    x = torch.randn(5, 4)
    handler.eval()
    assert not handler.model.training
    with torch.no_grad():
        assert torch.equal(handler(x), handler.model(x))
    handler.eval(False)
    assert handler.model.training
    handler.eval()
    handler.train(1, progress_bar=False)  # train sets the modes it needs itself
    assert len(handler.train_losses) == 1


@pytest.mark.parametrize("activate", [1, "no", None], ids=["int", "str", "none"])
def test_eval_takes_a_bool(activate: Any) -> None:
    with pytest.raises(TypeError, match=rf"eval\(activate={activate!r}\)"):
        make_handler().eval(activate)


# -- plots with the original's signature ----------------------------------------------------------
@pytest.fixture
def trained() -> NNHandler:
    pytest.importorskip("matplotlib")
    handler = make_handler()
    handler.train(3, progress_bar=False)
    return handler


def test_plot_losses_true_is_the_originals_log_scale(trained: NNHandler) -> None:
    with pytest.warns(DeprecationWarning, match=r"plot_losses\(True\).*log_y_scale"):
        figure = trained.plot_losses(True)  # type: ignore[arg-type]
    from matplotlib.figure import Figure

    assert isinstance(figure, Figure)
    assert [axis.get_yscale() for axis in figure.axes] == ["log"]
    plain = trained.plot_losses()
    assert [axis.get_yscale() for axis in plain.axes] == ["linear"]
    metrics = trained.plot_metrics(log_y_scale=True)
    assert [axis.get_title() for axis in metrics.axes] == ["mae"]
    assert [axis.get_yscale() for axis in metrics.axes] == ["log"]


def test_plot_with_a_path_and_log_scale_writes_the_png(trained: NNHandler, tmp_path: Path) -> None:
    path = trained.plot_losses(tmp_path / "l.png", log_y_scale=True)
    assert path == tmp_path / "l.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_show_goes_through_pyplot(trained: NNHandler) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-interactive.*")  # Agg cannot show
        figure = trained.plot_losses(show=True)
    try:
        assert plt.fignum_exists(figure.number)
    finally:
        plt.close(figure)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda h: h.plot_losses(3), r"plot_losses\(path=3\): a \.png path"),
        (lambda h: h.plot_losses(log_y_scale="yes"), r"plot_losses\(log_y_scale='yes'\)"),
        (lambda h: h.plot_metrics(show=1), r"plot_metrics\(show=1\): must be True or False"),
        (lambda h: h.plot_losses("l.jpg"), r"must end in \.png"),
    ],
    ids=["path-int", "log-scale-str", "show-int", "jpg"],
)
def test_bad_plot_arguments_are_clear_errors(trained: NNHandler, call: Any, pattern: str) -> None:
    with pytest.raises(ConfigurationError, match=pattern):
        call(trained)
