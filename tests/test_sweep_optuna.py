"""Optuna search over w_d, w_c and the SLURM launcher: composed; a 2-trial Optuna run for real."""

from __future__ import annotations

import json

import yaml
from hydra.utils import instantiate

from tests.conftest import compose_config


def test_optuna_config_composes(tmp_path):
    cfg = compose_config("eval", tmp_path, ["hparams_search=guidance_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "minimize" and cfg.optimized_metric == "fid"
    assert set(sweeper.params) == {"sample.w_d", "sample.w_c"}
    assert all(str(v).startswith("interval(") for v in sweeper.params.values())
    sampler = instantiate(sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"
    assert cfg.hydra.mode.name == "MULTIRUN"


def test_slurm_launcher_config_composes_and_builds(tmp_path):
    cfg = compose_config(
        "eval",
        tmp_path,
        ["hparams_search=guidance_grid", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.partition == "gpu"
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    # The plugin's launcher takes these parameters (built, never run: no SLURM here).
    built = instantiate(launcher)
    assert built.params["timeout_min"] == launcher.timeout_min
    assert built.params["partition"] == "gpu"


def test_two_trial_optuna_run_returns_the_metric(tmp_path, stand_in_sweep):
    """Real Optuna study (2 trials) through idgen-eval; a stand-in sampler keeps it fast."""
    sweep = tmp_path / "sweep"
    stand_in_sweep(
        "guidance_optuna", sweep, "~logger", "hydra.sweeper.n_trials=2", "metrics.fid.kid=false"
    )

    fids = {}
    for job in (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        metrics = json.loads((job / "metrics.json").read_text())
        fids[(metrics["params"]["w_d"], metrics["params"]["w_c"])] = metrics["fid"]
    assert len(fids) == 2
    assert all(0.0 <= w <= 7.0 for point in fids for w in point)  # drawn from the intervals
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the value Optuna saw is what main returned: the job's FID
    assert best["best_value"] == min(fids.values())
    point = (best["best_params"]["sample.w_d"], best["best_params"]["sample.w_c"])
    assert fids[point] == best["best_value"]
    assert (sweep / "summary.csv").is_file()
