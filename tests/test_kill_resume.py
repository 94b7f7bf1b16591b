"""kill -9 of a real idgen-train process at several moments, then a resume into the same run dir.

Each resumed run must end with the weights (and EMA) of an uninterrupted run, its CSV must hold
every step exactly once with the same losses, and no temp file may remain.
"""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import run_python

COMMON = [
    "stage=finetune",
    "preview.enabled=false",
    "data.num_images=16",
    "data.batch_size=4",  # 4 batches per epoch: the kills fall mid-epoch
    "callbacks.decoupled_sampling.every_n_train_steps=null",
    "callbacks.ema.decay=0.9",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.save_top_k=2",
    "trainer.max_steps=6",
]


def run_train(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        "-m",
        "idgen.train",
        f"hydra.run.dir={root / 'run'}",
        f"paths.root_dir={root}",
        *COMMON,
        *overrides,
    ]
    # one thread: bit-exact CPU results across processes; the repo importable: tests.kill_helpers
    return run_python(cmd, root, timeout=900, OMP_NUM_THREADS="1")


def final_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    return {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["ema"]["shadow"].items()}}


def losses(run: Path) -> list[tuple[str, str]]:
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_train(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    "step,where",
    [
        (3, "batch_end"),  # mid-epoch, between checkpoints: step 3 is lost and redone
        (4, "ckpt_write"),  # inside the write of step_0000004.ckpt
        (4, "before_last"),  # step_0000004.ckpt complete, last.ckpt still at step 2
    ],
)
def test_kill9_then_resume_equals_uninterrupted(tmp_path, reference, step, where):
    killed = run_train(
        tmp_path,
        "+callbacks.kill._target_=tests.kill_helpers.KillAt",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.where={where}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "run"
    if where == "ckpt_write":
        assert list((run / "checkpoints").glob(".*.tmp"))  # the kill left a partial file
    resumed = run_train(tmp_path, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ours, ref = final_state(run), final_state(reference)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)
    assert losses(run) == losses(reference)  # every step once, same values: the log continued
    assert not [p for p in run.rglob("*.tmp")]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_0000004.ckpt", "step_0000006.ckpt"]  # exactly top-2
