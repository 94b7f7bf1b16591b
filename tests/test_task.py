"""The one entry-point pattern (idgen.utils.task): loggers closed in `finally`, the run dir logged,
optimized_metric returned, and an error when it names a metric the run did not compute."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from idgen import evaluate, sample, text_to_3d, train
from idgen.utils.task import task_wrapper


def _cfg(tmp_path, metric=None):
    return OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "optimized_metric": metric})


def test_returns_the_optimized_metric(tmp_path):
    task = task_wrapper(lambda cfg: {"fid": 3.5, "clip_score": 0.25})
    assert task(_cfg(tmp_path, "clip_score")) == 0.25
    assert task(_cfg(tmp_path)) is None


def test_a_metric_not_computed_is_an_error(tmp_path, capsys):
    task = task_wrapper(lambda cfg: {"clip_score": 0.25})
    with pytest.raises(SystemExit) as exit_info:
        task(_cfg(tmp_path, "fid"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optimized_metric='fid'" in err and "clip_score" in err


def test_loggers_closed_and_run_dir_logged_even_when_the_task_fails(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")

    def failing(cfg):
        wandb.init(dir=str(tmp_path), project="idgen-test")
        raise RuntimeError("boom")

    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="boom"):
        task_wrapper(failing)(_cfg(tmp_path))
    assert wandb.run is None  # finished in `finally`
    assert f"run dir: {tmp_path}" in caplog.text


def test_every_cli_has_the_same_shape():
    for module in (train, sample, evaluate, text_to_3d):
        assert module.main.__wrapped__.__name__ == "hydra_main", module.__name__
        assert "group=null" in module.main.__doc__
