"""Every example runs as part of the suite (in a subprocess, bounded by a timeout)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from nnh_testing import PLUGIN_SRC, SDE_ENTRY_POINT, sde_plugin_installed, write_dist_info

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run_example(script: Path, *args: str, cwd: Path, path: Sequence[Path] = (),
                python_options: Sequence[str] = ()) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(
            [*map(str, path), *filter(None, [os.environ.get("PYTHONPATH")])])
    completed = subprocess.run(
        [sys.executable, *python_options, str(script), *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES} == {
        "quickstart.py", "manual_autosave_callback.py", "custom_state_provider.py",
        "ddp_train.py",  # run under torchrun by tests/test_distributed.py
        "score_based_sde.py", "preemptible_training.py",
        "fsdp_sharded.py",  # run under torchrun in tests/test_sharded_checkpoint.py
        "custom_saver.py", "mnist_basic.py",
        "long_epoch_steps.py",  # killed and resumed by tests/test_step_sigkill.py
        "remote_checkpoints.py",
    }


@pytest.mark.slow
@pytest.mark.parametrize("server", ["own", "session"], ids=["starts-moto", "endpoint"])
def test_remote_checkpoints_example_saves_resumes_and_exports_on_s3(
        server: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The example against S3: the moto server it starts itself (its default command), and
    the session's server given as ``--endpoint`` (a user's MinIO, say)."""
    arguments: list[str] = []
    if server == "session":
        arguments = ["--endpoint", request.getfixturevalue("s3_endpoint"),
                     "--bucket", request.getfixturevalue("s3_bucket")]
    stdout = run_example(ROOT / "examples" / "remote_checkpoints.py", *arguments, cwd=tmp_path)
    assert "first run: 3 epochs, objects ['ep002.pth', 'ep003.pth', 'nnhandler-index.json']" \
        in stdout
    assert re.search(r"\*\s+ep003\.pth\s+3\s+24 .* valid\s+latest 1/2", stdout), stdout
    assert ("second run resumed: epoch 5, 5 epochs of history, objects ['ep004.pth', "
            "'ep005.pth', 'nnhandler-index.json']") in stdout
    assert "plain torch loads it, same weights as epoch 5: True" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--background"]], ids=["sync", "background"])
def test_custom_saver_example_runs(mode: list[str], tmp_path: Path) -> None:
    stdout = run_example(ROOT / "examples" / "custom_saver.py", "--out", str(tmp_path / "s"),
                         *mode, cwd=tmp_path)
    assert "step checkpoints: step000040.pth, step000080.pth" in stdout
    assert "best.safetensors: True" in stdout and "restored saver: best" in stdout


def test_ported_mnist_notebook_trains_autosaves_loads_and_continues(tmp_path: Path) -> None:
    """The original NNHandler's MNIST notebook, ported with its renames: no DeprecationWarning
    is left (``-W error``), one overwritten auto-save remains, and training continued."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "PYTHONPATH": path}
    completed = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning:__main__",
         str(ROOT / "examples" / "mnist_basic.py"), "--out", "m"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    stdout = completed.stdout
    assert "checkpoint keys: ['format', 'meta', 'packs', 'state']" in stdout
    assert "loaded epoch 5: 5 epochs of history" in stdout
    assert "files: ['model_epoch_07.pth']" in stdout  # overwrite=True kept only the newest
    final = torch.load(tmp_path / "m" / "model_epoch_07.pth", weights_only=True)
    assert len(final["state"]["history"]["train_losses"]) == 7
    losses = final["state"]["history"]["val_losses"]
    assert losses[-1] < losses[0]
    right = int(re.search(r"(\d+)/20 of these digits right", stdout)[1])  # type: ignore[index]
    assert right >= 12  # chance is 2 of 20
    assert "model class: __main__:Net" in stdout
    assert (tmp_path / "m" / "training.log").read_text(encoding="utf-8").count("INFO") > 0


QUICKSTART = ROOT / "examples" / "quickstart.py"


def _epochs_of(folder: Path) -> list[int]:
    return [int(p.name.split("_acc")[0].removeprefix("spiral_ep"))
            for p in sorted(folder.glob("*.pth"))]


def _printed(stdout: str, prefix: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stdout
    return lines[0].removeprefix(prefix)


def test_quickstart_trains_saves_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    stdout = run_example(QUICKSTART, "--out", str(out), "--epochs", "4", "--interval", "2",
                         cwd=tmp_path)
    names = sorted(p.name for p in out.glob("*.pth"))
    assert [n.split("_acc")[0] for n in names] == ["spiral_ep002", "spiral_ep004", "spiral_ep006"]
    assert "resumed from spiral_ep004" in stdout
    assert "epochs trained: 6" in stdout
    final = torch.load(out / names[-1], weights_only=True)
    assert final["meta"]["epoch"] == 6
    assert len(final["state"]["history"]["train_losses"]) == 6
    # it says how to continue: the file, the command, and a snippet for another script
    assert _printed(stdout, "newest checkpoint: ") == str(out / names[-1])
    assert _printed(stdout, "to continue this run: ") == (
        f"python {QUICKSTART} --out {out} --interval 2")
    assert f'NNHandler.load_latest("{out}", device="cpu", model_class=SpiralNet,' in stdout
    assert "train_data=train_set, val_data=val_set)" in stdout


@pytest.mark.slow  # the quick subset runs the quickstart once (the test above)
def test_quickstart_default_command_runs(tmp_path: Path) -> None:
    """The README's main command, exactly as written (default output folder), without a
    single warning (``-W error::UserWarning``: e.g. torch's "Failed to initialize NumPy")."""
    stdout = run_example(QUICKSTART, cwd=tmp_path, python_options=["-W", "error::UserWarning"])
    assert "epochs trained: 25" in stdout
    assert _epochs_of(tmp_path / "checkpoints" / "quickstart") == [5, 10, 15, 20, 25]
    assert _printed(stdout, "to continue this run: ") == (
        f"python {QUICKSTART} --out checkpoints/quickstart")


def test_quickstart_run_again_continues_the_run(tmp_path: Path) -> None:
    """A second invocation into the same folder continues the first run on purpose, from its
    newest checkpoint, and says so; the folder holds one run (one file per saved epoch)."""
    out = tmp_path / "ck"
    arguments = ("--out", str(out), "--epochs", "2", "--interval", "2")
    first = run_example(QUICKSTART, *arguments, cwd=tmp_path)
    assert first.count("resumed from ") == 1  # only the restart: the run itself was fresh
    newest = _printed(first, "newest checkpoint: ")
    assert newest.endswith(".pth") and Path(newest).name.startswith("spiral_ep004_acc")
    second = run_example(QUICKSTART, *arguments, cwd=tmp_path)
    assert f"resumed from {Path(newest).name}: epoch 4, 4 epochs of history" in second
    assert "resumed from spiral_ep006" in second and "epochs trained: 8" in second
    assert _epochs_of(out) == [2, 4, 6, 8]
    final = torch.load(_printed(second, "newest checkpoint: "), weights_only=True)
    assert final["meta"]["epoch"] == 8
    assert len(final["state"]["history"]["train_losses"]) == 8
    assert len({torch.load(p, weights_only=True)["meta"]["lineage"]
                for p in out.glob("*.pth")}) == 1


def test_two_fresh_quickstart_runs_end_identically(tmp_path: Path) -> None:
    """Everything is seeded, the model's construction included: same numbers, to the bit."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        stdout = run_example(QUICKSTART, "--out", str(out), "--epochs", "3", "--interval", "3",
                             cwd=tmp_path)
        newest = torch.load(_printed(stdout, "newest checkpoint: "), weights_only=True)
        runs.append((_printed(stdout, "final logs: "), newest["state"]["history"],
                     sorted(p.name for p in out.glob("*.pth"))))
    assert runs[0] == runs[1]
    assert runs[0][0].startswith("epoch=6 loss=")


def test_quickstart_printed_snippet_continues_in_another_script(tmp_path: Path) -> None:
    """The snippet printed at the end, pasted into a script of one's own, continues the run."""
    out = tmp_path / "ck"
    stdout = run_example(QUICKSTART, "--out", str(out), "--epochs", "2", "--interval", "2",
                         cwd=tmp_path)
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("or, in a script"))
    snippet = [line.removeprefix("    ") for line in lines[start + 1:]]
    script = tmp_path / "continue_run.py"
    script.write_text("\n".join([
        "import sys",
        f"sys.path.insert(0, {str(QUICKSTART.parent)!r})",
        "from quickstart import SpiralNet, accuracy, two_spirals",
        "from nnhandler import NNHandler",
        "train_set, val_set = two_spirals(seed=0), two_spirals(n_per_class=100, seed=1)",
        *snippet,
        "print('continued to epoch', handler.epoch, sorted(handler.last_logs))",
    ]) + "\n")
    continued = run_example(script, cwd=tmp_path)
    assert ("continued to epoch 6 ['accuracy', 'epoch', 'loss', 'val_accuracy', 'val_loss']"
            in continued)
    assert _epochs_of(out) == [2, 4, 6]
    assert not list(out.glob("*NA.pth"))


@pytest.mark.slow
def test_manual_autosave_callbacks_example(tmp_path: Path) -> None:
    out = tmp_path / "manual"
    stdout = run_example(ROOT / "examples" / "manual_autosave_callback.py", "--out", str(out),
                         "--epochs", "4", cwd=tmp_path)
    assert sorted(p.name for p in out.glob("*.pth")) == ["latest.pth"]
    history = sorted(p.name.split("_val")[0] for p in (out / "history").glob("*.pth"))
    assert history == ["regressor_ep002", "regressor_ep004", "regressor_ep006"]
    assert torch.load(out / "latest.pth", weights_only=True)["meta"]["epoch"] == 6
    assert "after resume: epoch 6" in stdout
    # keep_best=2 on val_loss: the two best epochs and the newest, each with its reason
    best = sorted(p.name for p in (out / "best").glob("*.pth"))
    assert 2 <= len(best) <= 3 and any(name.startswith("regressor_ep006") for name in best)
    assert (out / "best" / "nnhandler-index.json").exists()
    assert stdout.count("kept as best val_loss=") == 2


@pytest.mark.slow
def test_custom_state_provider_example(tmp_path: Path) -> None:
    out = tmp_path / "custom"
    stdout = run_example(ROOT / "examples" / "custom_state_provider.py", "--out", str(out),
                         "--epochs", "3", cwd=tmp_path)
    checkpoint = torch.load(next(out.glob("*.pth")), weights_only=True)
    saved = checkpoint["state"]["best_validation_tracker"]
    assert f"best val loss {saved['best_loss']:.4f} at epoch {saved['best_epoch']}" in stdout


@pytest.mark.slow
def test_score_based_sde_example_trains_resumes_through_the_plugin_and_samples(
    tmp_path: Path,
) -> None:
    path = [ROOT, PLUGIN_SRC]
    if not sde_plugin_installed():  # a checkout without `pip install -e plugins/nnhandler-sde`
        path.insert(0, write_dist_info(tmp_path / "site", "nnhandler-sde",
                                       dict([SDE_ENTRY_POINT])))
    out = tmp_path / "sde"
    stdout = run_example(ROOT / "examples" / "score_based_sde.py", "--out", str(out),
                         cwd=tmp_path, path=path)
    assert "resumed from score_ep030.pth at epoch 30: VPSDE(beta_min=0.1, beta_max=20.0)" in stdout
    assert "epochs trained: 60" in stdout
    assert "samples match the data" in stdout
    assert sorted(p.name for p in out.glob("*.pth")) == [
        f"score_ep{epoch:03d}.pth" for epoch in (10, 20, 30, 40, 50, 60)]
    state = torch.load(out / "score_ep060.pth", weights_only=True)["state"]["sde"]
    assert state["samples_drawn"] == 6 * 512  # sample_every=10 over 60 epochs, across the resume


@pytest.mark.slow
def test_preemptible_training_example_is_requeued_and_resumes_exactly(tmp_path: Path) -> None:
    """A real SIGTERM mid-epoch to the training process, a requeue, an exact resume."""
    out = tmp_path / "ck"
    stdout = run_example(ROOT / "examples" / "preemptible_training.py", "--out", str(out),
                         cwd=tmp_path)
    # the signal reaches the worker a few batches after the line that triggered it
    assert re.search(r"\[job attempt 1\] preempted; resume from preempted_ep00[34]_b\d{5}\.pth",
                     stdout), stdout
    assert "exit status 3: requeued" in stdout
    assert "[job attempt 2] finished: epoch 6" in stdout
    assert "files: ['ep005.pth', 'ep006.pth']" in stdout  # keep_last=2 aged the rest out
    assert "preempted-and-resumed run equals the uninterrupted run: True" in stdout
