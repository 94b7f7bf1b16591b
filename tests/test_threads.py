"""CPU threads and DataLoader workers from the CPUs a process may use (idgen.utils.threads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from idgen.utils.task import configure_threads
from idgen.utils.threads import apply_threads, cgroup_cpu_limit, plan_threads, usable_cpus
from idgen.utils.validation import ConfigError


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, docker --cpus=1.5
        ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),  # v1
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1: none
        ({}, None),  # no cgroup files at all
    ],
)
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, expected):
    assert cgroup_cpu_limit(_cgroup(tmp_path, files)) == expected


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    quota = _cgroup(tmp_path / "q", {"cpu.max": "150000 100000"})
    assert usable_cpus(affinity=8, root=quota) == 2  # 1.5 CPUs: two threads half the time
    assert usable_cpus(affinity=1, root=quota) == 1  # the mask is smaller than the quota
    assert usable_cpus(affinity=8, root=tmp_path / "none") == 8
    tiny = _cgroup(tmp_path / "t", {"cpu.max": "10000 100000"})
    assert usable_cpus(affinity=8, root=tiny) == 1  # never 0
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))  # this machine's own files


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 6, 8, 16, 64, 128])
def test_computed_plans_never_oversubscribe(cpus):
    plan = plan_threads(cpus, omp_num_threads="")
    assert plan.threads >= 1 and plan.workers >= 0
    assert max(1, plan.workers) * plan.threads <= cpus
    assert plan.source == "computed"


def test_small_machines_load_in_the_training_process_large_ones_use_workers():
    for cpus, expected in ((2, (2, 0)), (8, (4, 2)), (64, (16, 4))):
        plan = plan_threads(cpus, omp_num_threads="")
        assert (plan.threads, plan.workers) == expected


def test_config_and_environment_override_the_computed_values():
    # the config's threads win over OMP_NUM_THREADS; workers then fit in what is left
    plan = plan_threads(16, threads=8, omp_num_threads="1")
    assert (plan.threads, plan.workers) == (8, 2) and plan.source == "threads=8"
    plan = plan_threads(16, omp_num_threads="1")
    assert plan.threads == 1 and plan.source == "OMP_NUM_THREADS=1"
    plan = plan_threads(2, workers=3, omp_num_threads="")
    assert plan.workers == 3 and plan.threads == 1  # the user's workers: threads shrink to fit
    assert "data.num_workers=3" in plan.source and "threads=N" in plan.describe()


def test_configure_threads_fills_null_workers_and_checks_the_keys(monkeypatch):
    monkeypatch.setattr("idgen.utils.task.apply_threads", lambda plan: None)
    cfg = OmegaConf.create({"threads": 1, "data": {"num_workers": None}})
    plan = configure_threads(cfg)
    assert plan.threads == 1 and cfg.data.num_workers == plan.workers
    cfg = OmegaConf.create({"threads": 1, "data": {"num_workers": 0}})
    assert configure_threads(cfg).workers == 0 and cfg.data.num_workers == 0
    with pytest.raises(ConfigError, match="threads"):
        configure_threads(OmegaConf.create({"threads": 0}))
    with pytest.raises(ConfigError, match="data.num_workers"):
        configure_threads(OmegaConf.create({"threads": None, "data": {"num_workers": -1}}))


def test_apply_sets_torch_and_the_environment(monkeypatch):
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    before = torch.get_num_threads()
    try:
        apply_threads(plan_threads(2, threads=2))
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)


def test_cpu_processes_of_one_run_share_the_cpus(monkeypatch):
    """trainer=ddp_sim (2 CPU processes): each plans for half, so 2 x threads <= CPUs."""
    plan = plan_threads(4, omp_num_threads="", processes=2)
    assert (plan.threads, plan.workers, plan.cpus) == (2, 0, 2)
    assert "2 processes share 4 CPUs" in plan.describe()
    monkeypatch.setattr("idgen.utils.task.apply_threads", lambda plan: None)
    monkeypatch.setattr("idgen.utils.task.plan_threads", plan_threads)
    cfg = OmegaConf.create(
        {
            "threads": None,
            "trainer": {"accelerator": "cpu", "devices": 2},
            "data": {"num_workers": None},
        }
    )
    assert configure_threads(cfg).source.startswith("2 processes share")
