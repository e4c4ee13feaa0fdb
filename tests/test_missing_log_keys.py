"""A name template key (or ``keep_best`` monitor) that the logs lack: said once, with the reason
(see the ``nnhandler.naming`` docstring for why it is a warning and not an error)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nnh_testing import checkpoint_files, make_handler

from nnhandler import Callback, NNHandler
from nnhandler.naming import LogSources, missing_key_reason

N = 16  # 2 training batches of 8, one validation batch
SOURCES = LogSources(metrics=("mae",), validates=True, validate_every=1)
NO_VAL = SOURCES._replace(validates=False)
EVERY_2 = SOURCES._replace(validate_every=2)
LOGS = {"epoch": 1, "loss": 0.5, "mae": 0.4, "val_loss": 0.6, "val_mae": 0.5}
TRAIN_LOGS = {"epoch": 1, "loss": 0.5, "mae": 0.4}


@pytest.mark.parametrize(
    ("key", "sources", "logs", "every_epoch", "says"),
    [
        ("val_loss", NO_VAL, TRAIN_LOGS, True, "no validation loader is set (set_val_loader)"),
        ("val_mae", NO_VAL, TRAIN_LOGS, True, "no validation loader"),
        ("val_loss", EVERY_2, TRAIN_LOGS, False, "epoch 1 did not validate (validate_every=2"),
        ("val_los", SOURCES, LOGS, True, "did you mean 'val_loss'?"),
        ("val_los", NO_VAL, TRAIN_LOGS, True,
         "did you mean 'val_loss' (logged only with a validation loader: set_val_loader)?"),
        ("val_accuracy", SOURCES, LOGS, True,
         "no metric is named 'accuracy' (add_metric('accuracy', fn) logs 'accuracy' and "
         "'val_accuracy')"),
        ("accuracy", SOURCES, LOGS, True,
         "neither the training loop nor a callback put 'accuracy' into these logs"),
        ("lss", SOURCES, LOGS, True, "did you mean 'loss'?"),
        ("learning_rat", SOURCES, {**LOGS, "learning_rate": 0.1}, True,
         "did you mean 'learning_rate'?"),
        ("mae", SOURCES, {"epoch": 1, "loss": 0.5}, False, "a callback removed it?"),
    ],
    ids=["val-without-loader", "val-metric-without-loader", "validate-every-skips",
         "typo-of-val-loss", "typo-of-val-loss-without-loader", "unknown-val-metric",
         "unknown-key", "typo-of-loss", "typo-of-a-callback-key", "removed-loop-key"],
)
def test_missing_key_reason(key: str, sources: LogSources, logs: dict[str, Any],
                            every_epoch: bool, says: str) -> None:
    missing = missing_key_reason(key, sources, 1, logs)
    assert says in missing.reason
    assert missing.every_epoch is every_epoch


@given(key=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
       validates=st.booleans(), validate_every=st.integers(1, 4), epoch=st.integers(1, 12))
def test_a_key_nobody_logs_is_missing_every_epoch(key: str, validates: bool,
                                                  validate_every: int, epoch: int) -> None:
    sources = LogSources(("mae",), validates, validate_every)
    loop_keys = sources.loop_keys(validating=True)
    missing = missing_key_reason(key, sources, epoch, {"epoch": epoch, "loss": 0.1})
    if key in loop_keys:
        # only a val_* key of a loader-less run, or of a skipped epoch, is missing on its own
        validation_epoch = validates and epoch % validate_every == 0
        assert missing.every_epoch is (key.startswith("val_") and not validates)
        assert ("did not validate" in missing.reason) is (
            key.startswith("val_") and validates and not validation_epoch)
    else:
        assert missing.every_epoch
        assert repr(key) in missing.reason


# -- through training ----------------------------------------------------------------------
class AddLearningRate(Callback):
    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        logs["learning_rate"] = 0.01 * epoch


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING and record.name.startswith("nnhandler")]


def train(handler: NNHandler, epochs: int, caplog: pytest.LogCaptureFixture,
          **kwargs: Any) -> list[str]:
    with caplog.at_level(logging.DEBUG, logger=handler.logger.name):
        handler.train(epochs=epochs, progress_bar=False, **kwargs)
    return warnings(caplog)


def test_val_key_without_validation_is_said_once_after_the_first_epoch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Said at the end of epoch 1, before the first save (epoch 2), and never again."""
    handler = make_handler(n=N, batch_size=8, validation=False)
    handler.auto_save(2, "ck", name="ep{epoch:02d}_v{val_loss:.4f}")
    said = train(handler, 6, caplog)
    assert len(said) == 1, said
    assert said[0].startswith("auto-save name template 'ep{epoch:02d}_v{val_loss:.4f}': key "
                              "'val_loss' is missing from the epoch-1 logs: no validation "
                              "loader is set (set_val_loader)")
    assert "such as ep01_vNA.pth (said once)" in said[0]
    assert checkpoint_files(Path("ck")) == ["ep02_vNA.pth", "ep04_vNA.pth", "ep06_vNA.pth"]
    # the later saves without it are logged, at debug level
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
             and "missing from the epoch" in r.getMessage()]
    assert len(debug) == 3


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("ep{epoch}_{val_los:.3f}", "'val_los' is missing from the epoch-1 logs: no metric is "
                                    "named 'los' (add_metric('los', fn) logs 'los' and "
                                    "'val_los') and no callback put 'val_los' into these "
                                    "logs; did you mean 'val_loss'?"),
        ("ep{epoch}_{val_acc:.3f}", "no metric is named 'acc'"),
        ("ep{epoch}_{learning_rat}", "did you mean 'learning_rate'?"),
    ],
    ids=["typo", "unknown-metric", "typo-of-a-callback-key"],
)
def test_a_key_nobody_logs_is_said_once_with_the_near_miss(
    caplog: pytest.LogCaptureFixture, name: str, says: str,
) -> None:
    handler = make_handler(n=N, batch_size=8)
    handler.add_callback(AddLearningRate())
    handler.auto_save(1, "ck", name=name)
    said = train(handler, 3, caplog)
    assert len(said) == 1, said
    assert says in said[0]
    assert len(checkpoint_files(Path("ck"))) == 3


def test_keys_that_callbacks_add_are_never_said_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = make_handler(n=N, batch_size=8)
    handler.auto_save(1, "ck", name="ep{epoch}_lr{learning_rate:.2f}_{val_mae:.3f}")
    handler.add_callback(AddLearningRate())  # after the auto-saver: it still runs first
    assert train(handler, 2, caplog) == []
    assert [name.split("_")[1] for name in checkpoint_files(Path("ck"))] == ["lr0.01", "lr0.02"]


def test_a_key_only_some_epochs_have_is_said_at_the_first_save_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = make_handler(n=N, batch_size=8)
    handler.auto_save(1, "ck", name="ep{epoch}_v{val_loss:.3f}")
    said = train(handler, 5, caplog, validate_every=2)
    assert len(said) == 1, said
    assert ("key(s) val_loss missing from the epoch-1 logs ('val_loss': epoch 1 did not "
            "validate (validate_every=2") in said[0]
    assert "saving as ep1_vNA.pth" in said[0]
    names = checkpoint_files(Path("ck"))
    assert [n for n in names if n.endswith("NA.pth")] == ["ep1_vNA.pth", "ep3_vNA.pth",
                                                          "ep5_vNA.pth"]


def test_a_new_template_is_checked_again(caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler(n=N, batch_size=8, validation=False)
    handler.auto_save(1, "ck", name="a{epoch}_{val_loss}")
    assert len(train(handler, 2, caplog)) == 1
    caplog.clear()
    handler.auto_save(1, "ck", name="b{epoch}_{val_loss}")
    assert len(train(handler, 1, caplog)) == 1


def test_keep_best_monitor_without_validation_is_said_once_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = make_handler(n=N, batch_size=8, validation=False)
    handler.auto_save(2, "ck", name="ep{epoch:02d}", keep_best=1, monitor="val_loss")
    said = train(handler, 6, caplog)
    assert len(said) == 1, said
    assert said[0].startswith("keep_best: monitor 'val_loss' is missing in the epoch-1 logs")
    assert "no validation loader is set (set_val_loader)" in said[0]
    assert checkpoint_files(Path("ck")) == ["ep06.pth"]  # no best candidate: the newest stays


def test_keep_best_monitor_on_a_skipped_epoch_is_said_at_the_save_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = make_handler(n=N, batch_size=8)
    handler.auto_save(1, "ck", name="ep{epoch:02d}", keep_best=1, monitor="val_loss")
    said = train(handler, 4, caplog, validate_every=2)
    assert len(said) == 1, said
    assert "epoch 1 did not validate (validate_every=2" in said[0]
