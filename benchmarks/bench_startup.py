"""Start-up cost of the CLIs: ``--help``, ``--cfg job``, a config error, and the preflight checks.

    python benchmarks/bench_startup.py [--repeats 3] [--json out.json]

Each command is run as a user runs it (a fresh ``python -m idgen.<cli>`` process, offline) and
reported as the median wall time and its ratio to the baseline measured in the same run: a
bare ``python -c pass`` start. Then ``validate_train/sample/eval`` in this process, in
milliseconds per call and as a ratio to composing the same config (they must stay negligible
next to it). These were wall-clock asserts in the tests once; timings live here, as ratios,
because a busy machine must not fail a test (tests/test_startup.py checks the behaviour: what
``import idgen.train`` loads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "python -c pass (baseline)": ["-c", "pass"],
    "idgen-train --help": ["-m", "idgen.train", "--help"],
    "idgen-sample --help": ["-m", "idgen.sample", "--help"],
    "idgen-eval --help": ["-m", "idgen.evaluate", "--help"],
    "idgen-3d --help": ["-m", "idgen.text_to_3d", "--help"],
    "idgen-train --cfg job": ["-m", "idgen.train", "--cfg", "job"],
    "idgen-train stage=bogus (error)": ["-m", "idgen.train", "stage=bogus"],
    "idgen-train data.batch_size=0 (error)": ["-m", "idgen.train", "data.batch_size=0"],
}


def run_once(args: list[str], cwd: str) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", IDGEN_ROOT=cwd)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def cli_times(repeats: int) -> dict[str, float]:
    """Median seconds per command; the commands are interleaved so load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(repeats):
            for name, args in COMMANDS.items():
                times[name].append(run_once(args, cwd))
    return {name: statistics.median(t) for name, t in times.items()}


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
            "train folder": (validate_train, "train", ["data=folder", f"data.root={root}/images"]),
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
    args = parser.parse_args(argv)
    clis = cli_times(args.repeats)
    baseline = clis["python -c pass (baseline)"]
    print(f"{'command':42s} {'median s':>9s} {'x baseline':>10s}")
    for name, seconds in clis.items():
        print(f"{name:42s} {seconds:9.2f} {seconds / baseline:10.1f}")
    checks = validation_times(max(args.repeats, 10))
    for name, row in checks.items():
        print(
            f"validate {name}: {row['validate_ms']:.2f} ms vs compose {row['compose_ms']:.1f} ms "
            f"(x{row['ratio']})"
        )
    results = {
        "cli_s": clis,
        "cli_ratio": {k: round(v / baseline, 2) for k, v in clis.items()},
        "validation": checks,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
