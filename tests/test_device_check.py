"""The prepared GPU check: `device_check.py --smoke` runs on the CPU as the GPU machine would
(no wandb, diffusers/hydra/omegaconf only from the wheel folder), and `make device-wheels`
prepares a folder that installs offline for Python 3.12."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "device_check.py"
WHEELS = REPO / "benchmarks" / "wheels"
# import name -> distribution name, for what the GPU machine lacks
DISTS = {
    "diffusers": "diffusers",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
}


def _load_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import device_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return device_check


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def _wheel_dist(path: Path) -> tuple[str, str, str]:
    """(normalised name, version, tag) from a wheel file name."""
    name, version, *_, tag_py, tag_abi, tag_plat = path.stem.split("-")
    return re.sub(r"[-_.]+", "-", name).lower(), version, f"{tag_py}-{tag_abi}-{tag_plat}"


def test_wheel_target_covers_what_the_check_installs():
    """The Makefile downloads (or builds) exactly the packages the check treats as missing,
    for Python 3.12, at the versions pinned in constraints.txt."""
    check = _load_check()
    assert set(check.DEVICE_MISSING) == set(DISTS)
    make = (REPO / "Makefile").read_text()
    listed = re.search(r"^DEVICE_WHEELS := (.+)$", make, re.M).group(1).split()
    built = re.findall(r"pip wheel .* (\S+)$", make, re.M)
    assert sorted(listed + built) == sorted(DISTS.values())
    recipe = make.split("device-wheels:")[1]
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "-c constraints.txt"):
        assert flag in recipe
    pins = _pins()
    assert all(d in pins for d in DISTS.values()), "every carried wheel has a pin"


@pytest.mark.skipif(not WHEELS.is_dir(), reason="no benchmarks/wheels: run `make device-wheels`")
def test_wheel_folder_installs_offline_and_imports_the_pinned_versions(tmp_path):
    wheels = sorted(WHEELS.glob("*.whl"))
    dists = [_wheel_dist(w) for w in wheels]
    names = [d[0] for d in dists]
    assert len(names) == len(set(names)), f"two versions of one package stop the install: {names}"
    assert set(names) == set(DISTS.values())
    pins = _pins()
    for name, version, tag in dists:
        assert version == pins[name], (name, version, pins[name])
        assert tag == "py3-none-any", f"{name}: {tag} may not install on the device's Python 3.12"
        with zipfile.ZipFile(WHEELS / [w.name for w in wheels if _wheel_dist(w)[0] == name][0]):
            pass  # a readable archive, not an LFS pointer or a partial download
    check = _load_check()
    check.install_wheels(WHEELS, tmp_path / "site")  # --no-index: no registry involved
    code = "import diffusers, hydra, omegaconf; print(diffusers.__file__, diffusers.__version__)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    where, version = out.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "site") and version == pins["diffusers"]


@pytest.mark.slow
def test_smoke_runs_every_section_like_the_gpu_machine(tmp_path):
    """`--smoke` with wandb unimportable and, when the wheel folder exists, diffusers, hydra and
    omegaconf too (as on the GPU machine): the check installs the wheels, runs every section
    and writes a complete table."""
    like_device = WHEELS.is_dir()  # a fresh clone (CI) has no wheel folder: only wandb blocked
    blocked = tmp_path / "blocked"
    for module in ("wandb", *(("diffusers", "hydra", "omegaconf") if like_device else ())):
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text(
            f"raise ImportError('{module} is not installed on the GPU machine')\n"
        )
    env = dict(
        os.environ,
        PYTHONPATH=str(blocked),
        TMPDIR=str(tmp_path),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    env.pop("WANDB_MODE", None)  # nothing may reach for wandb at all
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    if like_device:
        assert result["env"]["wheels"], "the wheels were installed, not taken from this venv"
    assert {k: v["status"] for k, v in result["sections"].items()} == {
        "sampling": "ok",
        "training": "ok",
        "cli": "ok",
        "tests": "ok",
        "memory": "ok",
        "sdxl": "ok",
    }
    rows = {r["name"]: r for r in result["rows"]}
    ratio = rows["fp16 b1 64px 2 steps: ours w_d=w_c=3.5"]
    assert ratio["baseline"] == "diffusers CFG g=7.5" and ratio["ratio"] > 0
    assert rows["bf16 b2 64px: null-text steps/s"]["baseline"] == "vanilla"
    assert rows["idgen-sample images written"]["value"] == 4
    assert rows["pytest -m gpu: skipped"]["value"] >= 4  # collected, skipped without CUDA
    # memory: the plan beside the measured peak of the same run, each preset against default
    plans = [r for r in result["rows"] if r["section"] == "memory" and ": plan (" in r["name"]]
    assert len(plans) == 5 and all(r["value"] > 0 and r["base_value"] > 0 for r in plans)
    low = rows["tiny_sdxl 64px b1 stage 2 memory=gpu24: steps/s"]
    assert low["baseline"] == "memory=default" and low["ratio"] > 0
    xl = rows["tiny_sdxl fp16 b1 64px 2 steps: ours w_d=w_c=3.5"]
    assert xl["section"] == "sdxl" and xl["baseline"] == "diffusers CFG g=7.5" and xl["ratio"] > 0
    assert all(r["ok"] is not False for r in result["rows"])
    assert "ours w_d=w_c=3.5" in proc.stdout  # the printed table


def test_bench_scripts_print_ratios_against_a_baseline_of_the_same_run(tmp_path):
    """The CPU benchmarks the README quotes run (tiny sizes) and report ratios to their baseline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    train = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "bench_train.py"), "--threads", "1", "--batch", "2"]
        + ["--steps", "1", "--rounds", "1", "--configs", "vanilla", "null-text+cache"]
        + ["--json", str(tmp_path / "train.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "train.json").read_text())["rows"]}
    assert rows["vanilla"]["speedup"] == 1.0
    assert rows["null-text+cache"]["speedup"] > 0
    # null-text trains fewer weights: attn2's to_q/to_k/to_v are gone, E_l added
    assert rows["null-text+cache"]["trained_params"] < rows["vanilla"]["trained_params"]
    sample = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "bench_sampling.py"), "--threads", "1"]
        + ["--steps", "1", "--batch", "1", "--repeats", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert re.search(r"diffusers CFG \(g=7\.5\)\s+\S+\s+1\.00x", sample.stdout)
    assert re.search(r"InDomain w_d=3\.5, w_c=3\.5\s+\S+\s+\d+\.\d+x", sample.stdout)
