"""idgen-eval: config composition, metrics.json, the optimised metric, CLI, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idgen.evaluate import evaluate, main
from idgen.metrics import TinyFeatureExtractor, fid_kid, list_images
from idgen.toyworld.demo import make_demo_domain
from idgen.utils.io import save_image_atomic
from tests.conftest import compose_config, run_python
from tests.test_metrics_clip import tiny_clip_dir  # noqa: F401  (fixture)

PROMPTS = ["a photo of a red circle", "a photo of a blue square"]


def _samples(folder: Path, n: int = 8, seed: int = 1, with_prompt: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        text = {"prompt": PROMPTS[i % 2], "seed": str(i)} if with_prompt else None
        save_image_atomic(img, folder / f"{i:05d}.png", text=text)
    return folder


@pytest.fixture
def folders(tmp_path):
    ref = make_demo_domain(tmp_path / "ref", num_images=12, resolution=64, seed=0)
    return ref, _samples(tmp_path / "samples")


def test_eval_tiny_fid_matches_library_and_main_returns_it(tmp_path, folders):
    ref, samples = folders
    cfg = compose_config(
        "eval",
        tmp_path,
        [f"samples_dir={samples}", f"reference_dir={ref}", "device=cpu", "optimized_metric=fid"],
    )
    results = evaluate(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["fid"] == pytest.approx(results["fid"])
    assert written["num_samples"] == 8 and written["num_reference"] == 12
    assert "NOT comparable" in written["feature_input"]
    direct = fid_kid(list_images(samples), ref, TinyFeatureExtractor(seed=0, input_size=64))
    assert results["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    # csv logger got the scalars
    logged = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "eval/fid" in logged
    # the second run reuses the cached reference features
    assert results["reference_cache"] == "miss"
    assert main.__wrapped__(cfg) == pytest.approx(results["fid"])  # what sweepers optimise
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["reference_cache"] == "hit"


def test_eval_clip_and_canny(tmp_path, tiny_clip_dir):  # noqa: F811
    samples = _samples(tmp_path / "samples", n=4)
    cfg = compose_config(
        "eval",
        tmp_path,
        [
            f"samples_dir={samples}",
            "metrics=clip",
            "metrics.fid=null",
            f"metrics.clip.model={tiny_clip_dir}",
            "optimized_metric=clip_score",
            "~logger",
            "device=cpu",
        ],
    )
    res = evaluate(cfg)
    assert res["clip_num_samples"] == 4 and res["clip_score"] >= 0
    assert "fid" not in res

    conds = tmp_path / "conds"
    conds.mkdir()
    for p in list_images(samples):  # condition = the sample's own edges -> discrepancy 0
        import cv2

        gray = cv2.cvtColor(np.asarray(Image.open(p).convert("RGB")), cv2.COLOR_RGB2GRAY)
        Image.fromarray(cv2.Canny(gray, 100, 200)).save(conds / p.name)
    cfg = compose_config(
        "eval",
        tmp_path,
        [
            f"samples_dir={samples}",
            "metrics=canny",
            f"metrics.canny.conditions_dir={conds}",
            "~logger",
        ],
    )
    res = evaluate(cfg)
    assert res["canny_discrepancy"] == 0.0 and res["canny_num_samples"] == 4


def test_eval_clear_errors(tmp_path, folders):
    ref, samples = folders
    cfg = compose_config("eval", tmp_path, [f"reference_dir={ref}", "~logger"])
    with pytest.raises(ValueError, match="samples_dir="):
        evaluate(cfg)
    cfg = compose_config(
        "eval",
        tmp_path,
        [f"samples_dir={tmp_path / 'nope'}", f"reference_dir={ref}", "~logger"],
    )
    with pytest.raises(FileNotFoundError, match="samples folder .* does not exist"):
        evaluate(cfg)
    cfg = compose_config("eval", tmp_path, [f"samples_dir={samples}", "metrics=canny", "~logger"])
    with pytest.raises(ValueError, match="metrics.canny.conditions_dir"):
        evaluate(cfg)
    no_prompt = _samples(tmp_path / "np", n=2, with_prompt=False)
    cfg = compose_config(
        "eval",
        tmp_path,
        [
            f"samples_dir={no_prompt}",
            "metrics=clip",
            "metrics.fid=null",
            "metrics.clip.model=/not/here",
            "~logger",
        ],
    )
    with pytest.raises(FileNotFoundError, match="no prompt known"):
        evaluate(cfg)
    cfg = compose_config(
        "eval",
        tmp_path,
        [
            f"samples_dir={samples}",
            "sample={module:idgen.no_such_sampler,overrides:[],images_subdir:samples}",
        ],
    )
    with pytest.raises(Exception, match="python -m idgen.no_such_sampler"):
        evaluate(cfg)


def test_eval_cli_writes_metrics_line(tmp_path, folders):
    ref, samples = folders
    cmd = [
        "-m",
        "idgen.evaluate",
        f"hydra.run.dir={tmp_path / 'cli'}",
        f"samples_dir={samples}",
        f"reference_dir={ref}",
    ]
    out = run_python(cmd, tmp_path, root=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "metrics (n=8 samples): fid=" in out.stdout + out.stderr
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["num_samples"] == 8
