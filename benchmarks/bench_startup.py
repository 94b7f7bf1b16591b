"""Start-up cost of the CLIs: ``--help``, ``--cfg job``, config errors, and the preflight checks.

    python benchmarks/bench_startup.py [--repeats 3] [--json out.json] [--skip-validation]

Each command is run as a user runs it (a fresh process running the console script as
pyproject.toml's [project.scripts] names it, offline) and reported as median wall and CPU
seconds and their ratio to the baseline measured in the same run: a bare ``python -c pass``.
Then ``validate_train/sample/eval`` in this process, in milliseconds per call and as a ratio to
composing the same config (they must stay negligible next to it). These were wall-clock asserts
in the tests once; timings live here, as ratios, because a busy machine must not fail a test
(tests/test_startup.py checks the behaviour: which libraries a command imports).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def console_script(name: str) -> list[str]:
    """``python -c`` running console script ``name`` as pyproject.toml's [project.scripts] says
    (the installed ``idgen-train`` is exactly this), so any checkout is measured as installed."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts[name].split(":")
    return ["-c", f"import sys; from {module} import {function} as m; sys.argv[0] = {name!r}; m()"]


COMMANDS = {
    "python -c pass (baseline)": ["-c", "pass"],
    "idgen-train --help": [*console_script("idgen-train"), "--help"],
    "idgen-sample --help": [*console_script("idgen-sample"), "--help"],
    "idgen-eval --help": [*console_script("idgen-eval"), "--help"],
    "idgen-3d --help": [*console_script("idgen-3d"), "--help"],
    "idgen-train --cfg job": [*console_script("idgen-train"), "--cfg", "job"],
    "idgen-train stage=bogus (error)": [*console_script("idgen-train"), "stage=bogus"],
    "idgen-sample sampler.w_d=-3 (error)": [*console_script("idgen-sample"), "sampler.w_d=-3"],
}


def run_once(args: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``python <args>`` in ``cwd``, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", IDGEN_ROOT=cwd)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cli_times(repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per command; the commands are interleaved so load hits all
    alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(repeats):
            for name, args in COMMANDS.items():
                times[name].append(run_once(args, cwd))
    return {
        name: {
            "wall_s": round(statistics.median(w for w, _ in t), 2),
            "cpu_s": round(statistics.median(c for _, c in t), 2),
        }
        for name, t in times.items()
    }


def validation_times(repeats: int) -> dict[str, dict[str, float]]:
    """``validate_*`` per call against composing its config, in this process (ms)."""
    sys.path.insert(0, str(REPO))
    from idgen.preflight import validate_eval, validate_sample, validate_train
    from tests.conftest import compose_config

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        from PIL import Image

        Image.new("RGB", (64, 64)).save(root / "images" / "a.png")
        cases = {
            "train": (validate_train, "train", []),
            "train folder": (
                validate_train,
                "train",
                ["data=folder", f"data.root={root}/images", "domain=face"],
            ),
            "sample (no domain model)": (validate_sample, "sample", ["sampler=cfg"]),
            "eval": (
                validate_eval,
                "eval",
                [f"samples_dir={root}/images", f"reference_dir={root}/images"],
            ),
        }
        for name, (check, config, overrides) in cases.items():
            start = time.perf_counter()
            for _ in range(repeats):
                cfg = compose_config(config, root, overrides)
            compose_ms = (time.perf_counter() - start) / repeats * 1000
            check(cfg)  # warm
            start = time.perf_counter()
            for _ in range(repeats):
                check(cfg)
            check_ms = (time.perf_counter() - start) / repeats * 1000
            out[name] = {
                "validate_ms": round(check_ms, 2),
                "compose_ms": round(compose_ms, 2),
                "ratio": round(check_ms / compose_ms, 3),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-validation", action="store_true", help="only the CLI timings")
    args = parser.parse_args(argv)
    clis = cli_times(args.repeats)
    base = clis["python -c pass (baseline)"]
    print(f"{'command':40s} {'wall s':>7s} {'x base':>7s} {'CPU s':>6s} {'x base':>7s}")
    for name, t in clis.items():
        wall, cpu = t["wall_s"], t["cpu_s"]
        print(
            f"{name:40s} {wall:7.2f} {wall / base['wall_s']:7.1f} {cpu:6.2f} "
            f"{cpu / max(base['cpu_s'], 0.01):7.1f}"
        )
    checks = {} if args.skip_validation else validation_times(max(args.repeats, 10))
    for name, row in checks.items():
        print(
            f"validate {name}: {row['validate_ms']:.2f} ms vs compose {row['compose_ms']:.1f} ms "
            f"(x{row['ratio']})"
        )
    results = {
        "cli": clis,
        "cli_wall_ratio": {k: round(v["wall_s"] / base["wall_s"], 2) for k, v in clis.items()},
        "validation": checks,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
