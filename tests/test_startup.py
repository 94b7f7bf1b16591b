"""Start-up and noise: ``--help``, ``--cfg job`` and config errors load no torch; a run's first
line says its CPU plan, and lines a user cannot act on are gone (timings:
benchmarks/bench_startup.py)."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import run_python

HEAVY = ("torch", "lightning", "diffusers", "transformers")

# Runs the console script ``idgen.cli.<entry>`` with ``argv`` and prints, at exit, which heavy
# libraries were imported (whatever way the script ended).
_CLI_PROBE = """
import atexit, sys
atexit.register(lambda: print("HEAVY:", sorted(m for m in {heavy!r} if m in sys.modules)))
sys.argv = ["idgen-x", *{argv!r}]
from idgen import cli
getattr(cli, {entry!r})()
"""


def _heavy_imported(stdout: str) -> list[str]:
    match = re.search(r"^HEAVY: (\[.*\])$", stdout, re.M)
    assert match, stdout[-2000:]
    return ast.literal_eval(match.group(1))


def test_the_entry_points_and_the_preflight_import_no_heavy_library(tmp_path):
    code = (
        "import sys, idgen.cli, idgen.preflight; print(sorted(m for m in %r if m in sys.modules))"
    )
    out = run_python(["-c", code % (HEAVY,)], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("entry", "argv", "code", "says"),
    [
        ("train", ["--help"], 0, "train is powered by Hydra"),
        ("sample", ["--help"], 0, "sample is powered by Hydra"),
        ("evaluate", ["--help"], 0, "evaluate is powered by Hydra"),
        ("text_to_3d", ["--help"], 0, "text_to_3d is powered by Hydra"),
        ("train", ["--cfg", "job", "stage=data"], 0, "stage: data"),
        ("train", ["stage=bogus"], 2, "error: stage='bogus'"),
        ("sample", ["sampler.w_d=-3"], 2, "error: sampler.w_d=-3.0"),
    ],
)
def test_help_config_printing_and_config_errors_load_no_torch(tmp_path, entry, argv, code, says):
    probe = _CLI_PROBE.format(
        heavy=HEAVY, argv=[*argv, f"hydra.run.dir={tmp_path}/run"], entry=entry
    )
    if "--help" in argv or "--cfg" in argv:
        probe = probe.replace(f"'hydra.run.dir={tmp_path}/run'", "")
    out = run_python(["-c", probe], tmp_path, root=tmp_path)
    assert out.returncode == code, out.stderr[-3000:]
    assert says in out.stdout + out.stderr
    assert _heavy_imported(out.stdout) == []
    if code == 2:  # the one error line, nothing else on stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr


# Lines a user cannot act on (issue 23), each as it was printed by a tiny toy-world run.
NOISE = {
    "diffusers' loading bar": "Loading pipeline components",
    "transformers' loading bar": "Loading weights",
    "diffusers' empty float32 list": "should be kept in float32: []",
    "Lightning's empty validation loader": "Total length of `DataLoader` across ranks is zero",
    "bitsandbytes' optional kernel": "Failed to load CPU gemm_4bit_forward",
    "a handler outliving its stream": "--- Logging error ---",
}


def test_a_tiny_run_states_its_cpu_plan_first_and_prints_no_library_noise(tmp_path):
    argv = [
        "-m", "idgen.train", f"hydra.run.dir={tmp_path}/run", "model=toyworld",
        "data.resolution=32", "data.num_images=16", "data.batch_size=8", "trainer.max_steps=2",
        "inversion_steps=2", "preview.num_inference_steps=2",
        "callbacks.progress_bar.refresh_rate=0", "threads=1",
    ]  # fmt: skip
    out = run_python(argv, tmp_path, root=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert "CPU: 1 torch thread(s), 0 DataLoader worker(s)" in first and "threads=1" in first
    assert (tmp_path / "run" / "domain_model").is_dir()  # it did train
    printed = out.stdout + out.stderr
    for what, line in NOISE.items():
        assert line not in printed, f"{what}: {line!r} is still printed"


def test_nothing_logged_after_the_run_hits_a_closed_stream(tmp_path):
    """A caller hands the CLI a stdout that it closes afterwards, then something logs (as an
    atexit hook would): Hydra's console handler must be gone by then."""
    code = f"""
import logging, sys
stream = open({str(tmp_path / "stdout.txt")!r}, "w")
sys.stdout = stream
sys.argv = ["idgen-train", "stage=bogus", "hydra.run.dir={tmp_path}/run"]
from idgen import cli
try:
    cli.train()
except SystemExit as exit:
    assert exit.code == 2
sys.stdout = sys.__stdout__
stream.close()
logging.getLogger("idgen.late").warning("a line after the run")
"""
    out = run_python(["-c", code], tmp_path, root=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Logging error" not in out.stderr and "closed file" not in out.stderr
    assert "a line after the run" in out.stderr  # Python's last-resort handler still shows it
    assert "CPU:" in (tmp_path / "stdout.txt").read_text()  # the run did log to that stream
