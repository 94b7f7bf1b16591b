"""A non-editable install works: the wheel carries the configs, installs into a fresh venv outside
the checkout, and ``idgen-train`` runs from another folder (``--help``, a tiny job, a user config
folder through ``--config-dir``). The build prints no license deprecation warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # builds a wheel and starts a few interpreters (about a minute)


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked, plus new files git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _env(**extra: str) -> dict[str, str]:
    """A user's shell: offline, and nothing that points into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IDGEN_ROOT")}
    return dict(env, HF_HUB_OFFLINE="1", WANDB_MODE="offline", **extra)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv outside the checkout with the wheel installed; its dependencies come from this
    interpreter's site-packages (a path in a .pth file: no registry needed, and the checkout's
    editable install, a .pth of its own there, is not processed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "src")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "-w", str(tmp / "dist"),
         "--no-deps", "--no-build-isolation", "-v"],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    printed = build.stdout + build.stderr
    assert build.returncode == 0, printed[-3000:]
    # the SPDX string (project.license = "Apache-2.0"), not the deprecated TOML table
    lines = [line for line in printed.lower().splitlines() if "license" in line]
    assert not [line for line in lines if "deprecat" in line or "warning" in line], lines
    (wheel,) = (tmp / "dist").glob("idgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "idgen/conf/train.yaml" in names and "idgen/conf/data/demo.yaml" in names

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True, env=_env(),
        ).stdout.strip()
    )  # fmt: skip
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, (install.stdout + install.stderr)[-3000:]
    return venv


def _run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    out = _run(
        installed,
        ["python", "-c", "import idgen; print(idgen.__file__, idgen.CONFIG_DIR)"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    module, config_dir = out.stdout.split()
    assert Path(module).is_relative_to(installed) and not Path(module).is_relative_to(REPO)
    assert (Path(config_dir) / "train.yaml").is_file()


def test_idgen_train_help_and_a_tiny_job_from_another_folder(installed, tmp_path):
    help_ = _run(installed, ["idgen-train", "--help"], tmp_path)
    assert help_.returncode == 0, help_.stderr[-2000:]
    assert "train is powered by Hydra" in help_.stdout and "data: demo" in help_.stdout
    job = [
        "idgen-train", "hydra.run.dir=run", "data.num_images=8", "data.batch_size=4",
        "trainer.max_steps=1", "inversion_steps=1", "preview.enabled=false",
    ]  # fmt: skip
    out = _run(installed, job, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "domain_model" / "config.json").is_file()  # trained and exported
    assert len(list((tmp_path / "data" / "demo_shapes").glob("*.png"))) == 8  # under the cwd


def test_a_user_config_folder_overrides_and_adds_configs(installed, tmp_path):
    """``--config-dir <folder>``: a config of the user's own (``data=eight``, built on the
    shipped ``demo``) is found beside the package's."""
    user = tmp_path / "my_conf" / "data"
    user.mkdir(parents=True)
    (user / "eight.yaml").write_text("defaults:\n  - demo\n  - _self_\nnum_images: 8\n")
    job = [
        "idgen-train", "--config-dir", str(tmp_path / "my_conf"), "data=eight", "stage=data",
        "preview.enabled=false", "hydra.run.dir=run",
    ]  # fmt: skip
    out = _run(installed, job, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = (tmp_path / "run" / "data_manifest.txt").read_text().splitlines()
    assert sum(line.startswith("train\t") for line in manifest) == 8
