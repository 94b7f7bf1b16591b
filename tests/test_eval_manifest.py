"""Evaluation scores exactly the images of the current sampling plan (idgen-sample's manifest).

The user's case: 24 images sampled, then the same run folder re-sampled with images_per_prompt
lowered to 18; idgen-eval scored 24. Here at a smaller scale (6, then 4) with the real
idgen-sample and idgen-eval code paths on the tiny model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from idgen.evaluate import evaluate
from idgen.metrics.evaluation import evaluate_folder
from idgen.metrics.manifest import images_to_score
from idgen.sample import sample
from tests.conftest import job_config


def _sample(tmp_path: Path, run: Path, images_per_prompt: int) -> dict:
    cfg = job_config(
        "sample",
        tmp_path,
        [
            "sampler=cfg",  # no domain model needed: plain classifier-free guidance
            "prompts=[a photo of a red circle]",
            f"images_per_prompt={images_per_prompt}",
            "batch_size=2",
            "sampler.num_inference_steps=2",
        ],
    )
    cfg.paths.output_dir = str(run)
    return sample(cfg)


def _count(paths, samples_dir) -> dict:
    """An extra metric that reports what evaluation handed it."""
    return {"seen": sorted(p.name for p in paths)}


def test_resampling_with_fewer_images_scores_only_the_current_plan(tmp_path, caplog):
    run = tmp_path / "sampling"
    _sample(tmp_path, run, images_per_prompt=6)
    _sample(tmp_path, run, images_per_prompt=4)
    images = run / "samples"
    on_disk = sorted(p.name for p in images.glob("*.png"))
    assert len(on_disk) == 6  # the old plan's two extra images are kept (nothing is lost)

    # the manifest describes the current plan: 4 records, seeds 0..3
    records = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]

    with caplog.at_level(logging.WARNING, logger="idgen.metrics.manifest"):
        results = evaluate_folder(images, extra_metrics=[_count])
    assert results["num_samples"] == 4
    assert results["seen"] == on_disk[:4]
    assert results["num_ignored_files"] == 2
    assert results["manifest"] == str(run / "samples.jsonl")
    # the user is told how many files were left out, which, and why
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "2 other image file(s)" in warning and on_disk[4] in warning
    assert "not in the current sampling plan" in warning

    # and through idgen-eval itself (FID against the same folder as reference): n = 4
    cfg = job_config(
        "eval",
        tmp_path,
        [f"samples_dir={images}", f"reference_dir={images}", "~logger", "metrics=tiny"],
    )
    cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(cfg)
    assert metrics["num_samples"] == 4 and metrics["num_ignored_files"] == 2
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["num_samples"] == 4


def test_manifest_is_rewritten_when_a_run_starts(tmp_path):
    """A run killed before it finishes must not leave the previous plan's manifest behind."""
    from PIL import Image

    from idgen.sampling.plan import SamplingPlan
    from idgen.sampling.writer import SampleWriter

    def writer(n: int) -> SampleWriter:
        return SampleWriter(tmp_path, SamplingPlan(("a",), n, 0), {"x": 1}, "hash0")

    old = writer(5)
    old.prepare()
    for i in range(5):
        item = {**old.plan.item(i), "image": Image.new("RGB", (8, 8)), "guidance_weights": {}}
        old.write(item)
    old.finalize()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 5

    new = writer(3)
    new.prepare()  # ... and the run is killed here, before finalize()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3
    scored = images_to_score(tmp_path / "samples")
    assert [p.name for p in scored.paths] == [old.plan.file_name(i) for i in range(3)]
    assert len(scored.ignored) == 2


def test_folder_without_manifest_is_scored_whole(tmp_path):
    """Images from elsewhere (no samples.jsonl) are all scored, none ignored."""
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    scored = images_to_score(tmp_path)
    assert len(scored.paths) == 3 and scored.ignored == [] and scored.manifest is None
