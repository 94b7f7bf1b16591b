"""Leftovers after a kill: the reference-feature cache's temp files are removed by the next run.

``kill -9`` while idgen-eval wrote its cache left ``.reference-features-*.pt.*.tmp`` that no
later run removed. Now a run removes the temp files of its own cache (matching its name
pattern) that are older than the run and whose writer process is gone; a write in progress in a
live process and other files' temp files are left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from idgen.metrics.cache import cache_path, load_cached, save_cached
from idgen.utils.io import PROCESS_START, remove_stale_temps, temp_prefix
from tests.conftest import REPO


def _plant(folder: Path, name: str, age_s: float | None = None) -> Path:
    """A temp file whose time is ``age_s`` before now; by default a minute before this process
    started (what "older than the run" means: in a long pytest session that is not "a minute ago")."""
    path = folder / name
    path.write_bytes(b"half a torch.save")
    past = PROCESS_START - 60.0 if age_s is None else time.time() - age_s
    os.utime(path, (past, past))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_run_removes_only_stale_temps_of_its_cache(tmp_path):
    cache = tmp_path / "reference_features"
    cache.mkdir()
    target = cache / "reference-features-0123456789abcdef01234567.pt"
    prefix_of = temp_prefix(target)  # .<name>.<host>-<pid>-
    host_and = prefix_of[: prefix_of.rindex("-", 0, -1) + 1]  # .<name>.<host>-
    # what today's main leaves after kill -9 (no writer in the name), and a dead writer's
    legacy = _plant(cache, f".{target.name}.k2j3h4ab.tmp")
    dead = _plant(cache, f"{host_and}{_dead_pid()}-x1y2z3.tmp")
    # kept: a live writer's (our parent: alive), a fresh one (newer than this run), others'
    live = _plant(cache, f"{host_and}{os.getppid()}-a1b2c3.tmp")
    fresh = _plant(cache, f".{target.name}.q9w8e7r6.tmp", age_s=-3600)
    other = _plant(cache, ".metrics.json.abcd1234.tmp")

    assert load_cached(cache, "0123456789abcdef01234567" + "0" * 40) is None  # a miss, and ...
    left = set(cache.iterdir())
    assert legacy not in left and dead not in left  # ... the killed writes' leftovers are gone
    assert {live, fresh, other} <= left


def test_killed_cache_write_is_cleaned_by_the_next_run(tmp_path):
    """A real ``kill -9`` half-way through writing the cache, then a normal run."""
    cache = tmp_path / "cache"
    script = (
        "import os, time\n"
        "from idgen.utils.io import atomic_torch_save\n"
        "os.fsync = lambda fd: (print('writing', flush=True), time.sleep(600))\n"
        # save_cached's write (its file name: cache_path), without importing all of metrics
        f"atomic_torch_save({{}}, {str(cache_path(cache, 'k' * 64))!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    leftovers = list(cache.glob(".reference-features-*.pt.*.tmp"))
    assert len(leftovers) == 1  # what the issue found

    # the next run (this process: started before the leftover's writer died, so age it)
    past = time.time() - 60
    os.utime(leftovers[0], (past, past))
    removed = remove_stale_temps(cache, "reference-features-*.pt", started=time.time())
    assert removed == leftovers and not leftovers[0].exists()
    save_cached(cache, "k" * 64, torch.ones(2, 3), {})
    assert torch.equal(load_cached(cache, "k" * 64), torch.ones(2, 3))
    assert [p.name for p in cache.iterdir()] == ["reference-features-kkkkkkkkkkkkkkkkkkkkkkkk.pt"]
