"""idgen-eval on an SD3 base: the ``sample:`` hook with ``sample.model=tiny_sd3`` and a 2x2
w_d x w_c grid, as for SD1.5 (tests/test_sweep_sample.py). Nothing in idgen-eval knows the
family: the hook forwards ``model=tiny_sd3`` to idgen-sample, which loads the SD3 base, the
null-text transformer and InDomainSD3Pipeline."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idgen.evaluate import evaluate
from idgen.models import FAMILIES, NullTextSD3Transformer, build_tiny_sd3
from idgen.toyworld.demo import make_demo_domain
from tests.conftest import compose_config, run_python

GRID_W_D = (0.0, 2.0)
GRID_W_C = (1.0, 3.0)


@pytest.fixture(scope="module")
def sd3_domain(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained SD3 null-text transformer (context = the encoded prompt) and 8 reference
    images: enough to exercise w_d on the SD3 path."""
    root = tmp_path_factory.mktemp("sd3_eval")
    sd = build_tiny_sd3(seed=0)
    embeds, pooled = FAMILIES["sd3"].encode_prompt(sd, ["a photo of shapes"])
    domain = root / "domain_model"
    NullTextSD3Transformer.from_transformer(sd.transformer, embeds, pooled).save_pretrained(domain)
    ref = make_demo_domain(root / "ref", num_images=8, resolution=64, seed=0)
    return domain, ref


def hook(domain: Path, w_d: float, w_c: float) -> list[str]:
    """The documented sweep's overrides (idgen/conf/hparams_search/guidance_grid.yaml) for one
    grid point on the tiny SD3."""
    return [
        "hparams_search=guidance_grid",
        "sample.model=tiny_sd3",
        f"sample.domain_model={domain}",
        "sample.images_per_prompt=1",
        "sample.batch_size=2",
        "sample.steps=2",
        f"sample.w_d={w_d}",
        f"sample.w_c={w_c}",
    ]


def read_samples(run: Path) -> tuple[list[dict], np.ndarray]:
    """idgen-sample's records (samples.jsonl) and images of one sampling run dir."""
    records = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    pixels = np.stack([np.asarray(Image.open(run / r["file"])) for r in records]).astype(int)
    return records, pixels


def test_eval_samples_a_2x2_grid_with_tiny_sd3_through_the_hook(tmp_path, sd3_domain):
    """Each grid point as the basic launcher runs it (compose, then the task, in one process):
    idgen-sample ran on the tiny SD3 with the point's weights, the images (64 px, the SD3
    geometry) are what evaluation scored, and different weights gave different images."""
    domain, ref = sd3_domain
    pixels = {}
    for w_d in GRID_W_D:
        for w_c in GRID_W_C:
            job = tmp_path / f"wd{w_d}_wc{w_c}"
            extra = [f"reference_dir={ref}", "device=cpu", "~logger"]
            results = evaluate(compose_config("eval", job, [*hook(domain, w_d, w_c), *extra]))
            assert results["params"] == {"w_d": w_d, "w_c": w_c}
            assert results["num_samples"] == 2 and math.isfinite(results["fid"])
            run = job / "run" / "sampling"
            assert results["samples_dir"] == str(run / "samples")
            records, pixels[(w_d, w_c)] = read_samples(run)
            assert pixels[(w_d, w_c)].shape == (2, 64, 64, 3)
            for r in records:
                assert r["model_ids"]["sd"].startswith("build_tiny_sd3(")
                expected = {"control": w_c} | ({"domain": w_d} if w_d else {})
                assert r["guidance_weights"] == expected  # the weights really used
    keys = list(pixels)
    assert all(np.abs(pixels[a] - pixels[b]).max() > 0 for a in keys for b in keys if a < b)


@pytest.mark.slow  # one idgen-eval process (python + torch start) sampling 4 points (~10 s CPU)
def test_guidance_sweep_with_tiny_sd3_as_a_multirun(tmp_path, sd3_domain):
    """`idgen-eval -m hparams_search=guidance_grid sample.model=tiny_sd3 ...` as a user types
    it: 4 jobs, each sampled on the SD3 base with its own weights, and the sweep summary over
    the grid."""
    domain, ref = sd3_domain
    sweep = tmp_path / "sweep"
    cmd = [
        "-m", "idgen.evaluate", "-m", *hook(domain, 0, 0)[:-2],
        "sample.w_d=" + ",".join(map(str, GRID_W_D)), "sample.w_c=" + ",".join(map(str, GRID_W_C)),
        f"hydra.sweep.dir={sweep}", f"reference_dir={ref}", "device=cpu", "~logger",
    ]  # fmt: skip
    out = run_python(cmd, tmp_path, root=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4
    for job in jobs:
        params = json.loads((job / "metrics.json").read_text())["params"]
        records, _ = read_samples(job / "sampling")
        for r in records:
            assert r["model_ids"]["sd"].startswith("build_tiny_sd3(")
            assert (r["sampler"]["w_d"], r["sampler"]["w_c"]) == (params["w_d"], params["w_c"])
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    grid = {(float(r["sample.w_d"]), float(r["sample.w_c"])): float(r["fid"]) for r in rows}
    assert set(grid) == {(d, c) for d in GRID_W_D for c in GRID_W_C}
    assert all(math.isfinite(v) for v in grid.values())
