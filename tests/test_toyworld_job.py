"""The toy world end to end (idgen.toyworld.job) and the paper's claims checked in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from idgen import CONFIG_DIR
from idgen.evaluate import evaluate
from idgen.toyworld import BASE_DIR, render_world, score
from idgen.toyworld.eval_metrics import named, toy_scores
from idgen.toyworld.figure import comparison_figure, sample_path
from idgen.toyworld.job import parse_args, run
from idgen.utils.io import save_image_atomic
from tests.conftest import compose_config


def _write_samples(folder: Path, prompts: list[str], per_prompt: int, world: str) -> list:
    """idgen-sample's layout and PNG text chunks, with renders of the prompted colour/shape."""
    images = []
    for p, prompt in enumerate(prompts):
        colour, shape = prompt.split()[-2:]
        rendered, _ = render_world(world, per_prompt, 32, seed=p, colour=colour, shape=shape)
        for k, image in enumerate(rendered):
            save_image_atomic(image, sample_path(folder, p, k, per_prompt), {"prompt": prompt})
            images.append(image)
    return images


def test_prompt_words_are_read_as_targets():
    assert named("a photo of a red circle", ("red", "blue")) == "red"
    assert named("a photo of a shape", ("red", "blue")) is None
    assert named("a red and blue circle", ("red", "blue")) is None  # ambiguous: not scored
    assert named("a reddish circle", ("red",)) is None  # whole words only


def test_toy_scores_follow_the_prompts_and_skip_prompts_without_targets():
    images, specs = render_world("domain", 24, 32, seed=3)
    arrays = [np.asarray(im) for im in images]
    right = [f"a {s.colour} {s.shape}" for s in specs]
    expected = score(images, [s.colour for s in specs], [s.shape for s in specs])
    got = toy_scores(arrays, right)
    for key in ("colour_accuracy", "shape_accuracy", "dark_fraction", "no_object_rate"):
        assert got[key] == pytest.approx(expected[key])
    # Every prompt names another colour: colour accuracy drops to 0, shape is unchanged.
    other = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
    wrong = toy_scores(arrays, [f"a {other[s.colour]} {s.shape}" for s in specs])
    assert wrong["colour_accuracy"] == 0.0
    assert wrong["shape_accuracy"] == pytest.approx(expected["shape_accuracy"])
    # No colour or shape named: only the prompt-free metrics are reported.
    plain = toy_scores(arrays, ["a photo of a shape"] * len(arrays))
    assert "colour_accuracy" not in plain and plain["dark_fraction"] == 1.0
    with pytest.raises(ValueError, match="24 images for 1 prompts"):
        toy_scores(arrays, ["a red circle"])


def test_idgen_eval_metrics_toyworld_scores_a_sample_folder(tmp_path):
    prompts = ["a red circle", "a blue square", "a yellow triangle"]
    samples = tmp_path / "samples"
    images = _write_samples(samples, prompts, 4, "open")
    reference = tmp_path / "domain"
    for i, image in enumerate(render_world("domain", 16, 32, seed=9)[0]):
        save_image_atomic(image, reference / f"{i:03d}.png")
    cfg = compose_config(
        "eval",
        tmp_path,
        [
            "metrics=toyworld",
            f"samples_dir={samples}",
            f"reference_dir={reference}",
            "device=cpu",
            "~logger",
        ],
    )
    results = evaluate(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    targets = [p.split()[-2:] for p in prompts for _ in range(4)]
    direct = score(images, [c for c, _ in targets], [s for _, s in targets])
    assert written["colour_accuracy"] == pytest.approx(direct["colour_accuracy"]) == 1.0
    assert written["dark_fraction"] == pytest.approx(direct["dark_fraction"])
    assert written["toyworld_num_samples"] == 12
    assert "fid" in results and "size32" in results["feature_extractor"]


def test_toyworld_model_config_loads_the_shipped_base(tmp_path):
    text = (Path(CONFIG_DIR) / "model" / "toyworld.yaml").read_text()
    assert str(BASE_DIR) not in text  # no machine path in the config
    cfg = compose_config("train", tmp_path, ["experiment=toyworld"])
    assert Path(cfg.model.pretrained).resolve() == BASE_DIR.resolve()
    assert cfg.data.resolution == 32
    pipe = instantiate(cfg.model)()
    assert pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 32
    # the baseline trains on the same data, steps and learning rate as ours' stage 2
    ft = compose_config("train", tmp_path, ["experiment=toyworld_finetune"])
    assert ft.trainer.max_steps == cfg.trainer.max_steps
    assert ft.module.optimizer.lr == cfg.module.optimizer.lr
    assert ft.data.batch_size == cfg.data.batch_size and ft.data.root == cfg.data.root
    assert ft.module.method._target_.endswith("FullFinetune") and ft.stage == "finetune"


def test_comparison_figure_places_each_rows_images(tmp_path):
    prompts = ["a red circle", "a green square"]
    rows = {
        "base": _write_samples(tmp_path / "base", prompts, 3, "open"),
        "ours": _write_samples(tmp_path / "ours", prompts, 3, "domain"),
    }
    out = comparison_figure(
        {name: tmp_path / name for name in rows}, prompts, 3, tmp_path / "c.png", 2, scale=1
    )
    figure = np.asarray(Image.open(out).convert("RGB"))
    pad, label_w, header_h = 4, 80, 28
    # cell (row r, prompt c, image i) holds that row's image i of prompt c
    for r, images in enumerate(rows.values()):
        for c in range(2):
            for i in range(2):
                y = header_h + pad + r * (2 * 32 + pad + pad) + i * (32 + pad)
                x = label_w + pad + c * (32 + pad)
                assert np.array_equal(figure[y : y + 32, x : x + 32], np.asarray(images[c * 3 + i]))


# The paper's claims (issue: "the toy world proves the paper"), at the job's documented
# setting, chosen on validation seeds (experiments/toyworld/sweep.py --seed 1000) before these
# evaluation seeds (0 .. 95) were looked at. Thresholds as stated in the issue; never lowered.
BASE_MIN_COLOUR = 0.9
MIN_DARK = 0.9  # fine-tuning and ours both reach the domain...
OURS_MIN_COLOUR = 0.8  # ...only ours keeps text control...
MIN_COLOUR_MARGIN = 0.2  # ...and ours dominates: at least this much more colour than fine-tuning


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """The job with its defaults, once for the claims below: (out folder, results)."""
    out = tmp_path_factory.mktemp("toyworld_job") / "toy"
    return out, run(parse_args(["--out", str(out), "--threads", "1"]))


def _mtimes(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` and when it was last written."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_job_end_to_end_shows_the_claims_and_resumes(job_run):
    out, results = job_run
    rows = results["rows"]
    base, finetune, ours = rows["base"], rows["finetune"], rows["ours"]
    for m in rows.values():
        assert m["num_samples"] == 96
    assert base["colour_accuracy"] >= BASE_MIN_COLOUR  # the start point: it follows colours...
    assert base["dark_fraction"] <= 0.3  # ...and the domain is rare in its open world
    assert finetune["dark_fraction"] >= MIN_DARK  # the baseline did learn the domain
    assert ours["dark_fraction"] >= MIN_DARK
    assert ours["colour_accuracy"] >= OURS_MIN_COLOUR  # ...and ours keeps text control
    assert "ours_auto" in rows  # the paper's automatic weights, reported (no claim on them)
    for name in ("results.md", "results.json", "comparison.png"):
        assert (out / name).is_file()
    assert "NOT Inception FID" in (out / "results.md").read_text()
    # A rerun finds every stage finished: no model or image is written again, same numbers.
    # (How much faster the rerun is: benchmarks/bench_toyworld_rerun.py, not a test.)
    kept = {
        "ours": out / "ours" / "domain_model",
        "fine-tuning": out / "finetune" / "baseline_model",
        **{f"{row} images": out / "samples" / row / "samples" for row in rows},
    }
    before = {name: _mtimes(folder) for name, folder in kept.items()}
    again = run(parse_args(["--out", str(out), "--threads", "1"]))
    assert again["rows"] == rows
    for name, folder in kept.items():
        assert before[name] and _mtimes(folder) == before[name], f"{name} was written again"


@pytest.mark.slow
def test_job_ours_dominates_fine_tuning(job_run):
    """Both reach the domain (dark >= 0.9); ours keeps >= 0.2 more colour accuracy, read from
    the job's own results.json (the numbers the README's table reports)."""
    out, results = job_run
    written = json.loads((out / "results.json").read_text())["rows"]
    assert written == results["rows"]
    finetune, ours = written["finetune"], written["ours"]
    assert finetune["dark_fraction"] >= MIN_DARK and ours["dark_fraction"] >= MIN_DARK
    assert ours["colour_accuracy"] >= OURS_MIN_COLOUR
    assert ours["colour_accuracy"] - finetune["colour_accuracy"] >= MIN_COLOUR_MARGIN
