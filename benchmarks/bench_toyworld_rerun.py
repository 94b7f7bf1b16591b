"""How much a rerun of the toy-world job costs against its first run (every stage is reused).

    python benchmarks/bench_toyworld_rerun.py [--steps 20] [--out <dir>]

Runs ``idgen.toyworld.job`` once on a small budget (first run: trains, samples, evaluates), then
again into the same folder (trained models and finished images are reused), and reports both
wall times per stage and the rerun's ratio to the first run, measured in the same process. The
test suite checks the behaviour (a rerun writes no model or image again:
tests/test_toyworld_job.py); this script is where the timing lives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from idgen.toyworld.job import parse_args, run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps of both methods")
    parser.add_argument("--out", type=Path, default=None, help="job folder (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "toy"
        job = [
            "--out", str(out), "--steps", str(args.steps), "--inversion-steps", "5",
            "--sample-steps", "4", "--images-per-prompt", "2", "--jobs", "1", "--threads", "1",
            "--prompts", "a red circle", "a blue square",
        ]  # fmt: skip
        start = time.perf_counter()
        first = run(parse_args(job))
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = run(parse_args(job))
        again_s = time.perf_counter() - start
    result = {
        "first_s": round(first_s, 1),
        "rerun_s": round(again_s, 1),
        "rerun_ratio": round(again_s / first_s, 3),
        "first_stages_s": first["timings_s"],
        "rerun_stages_s": again["timings_s"],
        "load_average": list(os.getloadavg()),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
