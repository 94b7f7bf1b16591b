"""The toy world's spatial control: condition masks, the mask-IoU metric, the toy ControlNet."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from idgen.metrics.images import ImageFolderError
from idgen.toyworld import BASE_DIR
from idgen.toyworld.conditions import (
    CONDITIONS_INDEX,
    condition_mask,
    foreground_mask,
    mask_iou,
    render_mask,
    write_conditions,
)
from idgen.toyworld.eval_metrics import ToyMaskAlignment
from idgen.toyworld.render import render_world
from idgen.utils.io import save_image_atomic

from .conftest import compose_config

CONTROLNET_DIR = BASE_DIR.parent / "controlnet"


def test_mask_is_the_rendered_objects_footprint_on_every_background():
    images, specs = render_world("open", 64, 32, seed=3)
    assert len({s.background for s in specs}) > 4  # several backgrounds, jittered
    ious = []
    for image, spec in zip(images, specs, strict=True):
        mask = np.asarray(render_mask(spec, 32))
        ious.append(mask_iou(np.asarray(image), mask))
        # closed form: a circle's mask covers pi r^2 of the image
        if spec.shape == "circle":
            assert condition_mask(mask).mean() == pytest.approx(math.pi * spec.radius**2, rel=0.1)
    # ground truth: the object's own foreground lines up with its mask (at 32px the
    # anti-aliased rim decides a pixel or two: about 0.93 on average, 0.78 at worst)
    assert np.mean(ious) > 0.9 and min(ious) > 0.75
    # another object's mask overlaps much less
    assert mask_iou(np.asarray(images[0]), np.asarray(render_mask(specs[1], 32))) < 0.7


def test_iou_edge_cases():
    blank = np.full((8, 8, 3), 200, np.uint8)
    black = np.zeros((8, 8, 3), np.uint8)
    assert not foreground_mask(blank).any()
    assert mask_iou(blank, black) == 1.0  # nothing asked, nothing drawn
    square = blank.copy()
    square[2:6, 2:6] = (220, 40, 40)
    cond = black.copy()
    cond[2:6, 2:4] = 255
    assert mask_iou(square, cond) == pytest.approx(8 / 16)
    with pytest.raises(ValueError, match="condition is"):
        mask_iou(square, np.zeros((4, 4, 3), np.uint8))


def test_write_conditions_is_deterministic_and_indexed(tmp_path):
    records = write_conditions(tmp_path / "a", 4, seed=7, shapes=["circle", "square"])
    again = write_conditions(tmp_path / "b", 2, seed=7, shapes=["circle", "square"])
    assert [r["spec"]["shape"] for r in records] == ["circle", "square", "circle", "square"]
    assert again == records[:2]  # condition i does not depend on how many there are
    a = np.asarray(Image.open(tmp_path / "a" / "c0001.png"))
    assert (a == np.asarray(Image.open(tmp_path / "b" / "c0001.png"))).all()
    index = (tmp_path / "a" / CONDITIONS_INDEX).read_text().splitlines()
    assert [json.loads(x)["caption"] for x in index] == [r["caption"] for r in records]
    assert all(np.mean(r["spec"]["background"]) < 60 for r in records)  # domain world: dark


def _sample_png(path, image, control_image):
    record = {"sampler": {"control_image": str(control_image)}, "prompt": "a red circle"}
    save_image_atomic(image, path, {"prompt": "a red circle", "idgen": json.dumps(record)})


def test_mask_alignment_metric_pairs_by_the_recorded_condition(tmp_path):
    images, specs = render_world("domain", 2, 32, seed=1)
    conds = tmp_path / "conditions"
    for i, spec in enumerate(specs):
        save_image_atomic(render_mask(spec, 32), conds / f"m{i}.png")
    samples = tmp_path / "samples"
    # sample 0 follows its condition, sample 1 was given the other object's mask
    _sample_png(samples / "s0.png", images[0], conds / "m0.png")
    _sample_png(samples / "s1.png", images[1], conds / "m0.png")
    paths = sorted(samples.glob("*.png"))
    got = ToyMaskAlignment()(paths, samples)
    expected = [
        mask_iou(np.asarray(images[0]), np.asarray(render_mask(specs[0], 32))),
        mask_iou(np.asarray(images[1]), np.asarray(render_mask(specs[0], 32))),
    ]
    assert got == {"mask_iou": pytest.approx(np.mean(expected)), "mask_iou_num_samples": 2}
    # a moved conditions folder: the recorded file name is looked up there
    moved = tmp_path / "moved"
    conds.rename(moved)
    assert ToyMaskAlignment(moved)(paths, samples)["mask_iou"] == pytest.approx(got["mask_iou"])
    with pytest.raises(ImageFolderError, match="no condition mask"):
        ToyMaskAlignment()(paths, samples)


def test_spatial_suite_and_sampler_compose(tmp_path):
    cfg = compose_config("eval", tmp_path, ["metrics=toyworld_spatial"])
    assert cfg.metrics.extra.mask_alignment._target_.endswith("ToyMaskAlignment")
    assert cfg.metrics.extra.toyworld  # the toy metrics stay
    # the config header's command
    cfg = compose_config("sample", tmp_path, ["model=toyworld", "sampler=controlnet_toyworld"])
    assert cfg.sampler.name == "controlnet"
    assert cfg.sampler.controlnet == str(CONTROLNET_DIR)
    # the recipe measures the ControlNet at the scale the sampler uses
    from idgen.toyworld.pretrain_controlnet import Recipe

    assert cfg.sampler.controlnet_conditioning_scale == Recipe().conditioning_scale


def test_recipe_writes_a_loadable_controlnet(tmp_path):
    from idgen.toyworld.pretrain_controlnet import main

    torch.set_num_threads(1)
    args = ["--base", str(BASE_DIR), "--out", str(tmp_path / "cn"), "--steps", "2"]
    meta = main([*args, "--batch-size", "4", "--eval-num", "2", "--eval-steps", "2"])
    net = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert list(net.config.conditioning_embedding_out_channels) == [16, 32, 64]
    assert sum(p.numel() for p in net.parameters()) == meta["parameters"]
    assert set(meta["metrics"]) == {"with_controlnet", "without_controlnet"}
    card = (tmp_path / "cn" / "README.md").read_text()
    assert "--steps 2 --batch-size 4" in card
    with pytest.raises(SystemExit, match="not a diffusers folder"):
        main(["--base", str(tmp_path), "--out", str(tmp_path / "x")])


@pytest.mark.skipif(not CONTROLNET_DIR.is_dir(), reason="toy ControlNet not shipped yet")
def test_shipped_controlnet_follows_its_condition():
    """On open-world masks, IoU with the ControlNet is clearly above the same seeds without."""
    from idgen.models import load_sd
    from idgen.toyworld.pretrain_controlnet import alignment

    torch.set_num_threads(1)
    sd = load_sd(str(BASE_DIR))
    net = ControlNetModel.from_pretrained(CONTROLNET_DIR)
    result = alignment(sd, net, num=32, num_inference_steps=20, seed=99)
    with_cn, without = result["with_controlnet"], result["without_controlnet"]
    assert with_cn["mask_iou"] > 0.6
    assert with_cn["mask_iou"] > without["mask_iou"] + 0.25
    # spatial control does not cost the text control
    assert with_cn["colour_accuracy"] >= without["colour_accuracy"] - 0.15


@pytest.mark.skipif(not CONTROLNET_DIR.is_dir(), reason="toy ControlNet not shipped yet")
def test_idgen_sample_and_eval_with_the_shipped_controlnet(tmp_path):
    """The config headers' commands: idgen-sample sampler=controlnet_toyworld, idgen-eval."""
    from idgen.evaluate import evaluate
    from idgen.sample import sample

    records = write_conditions(tmp_path / "conditions", 1, seed=5)
    cond = tmp_path / "conditions" / records[0]["file"]
    cfg = compose_config(
        "sample",
        tmp_path,
        [
            "model=toyworld",
            "sampler=controlnet_toyworld",
            f"sampler.control_image={cond}",
            "sampler.num_inference_steps=10",
            f"prompts=['{records[0]['caption']}']",
            "images_per_prompt=2",
            "batch_size=2",
        ],
    )
    summary = sample(cfg)
    cfg = compose_config(
        "eval",
        tmp_path / "eval",
        ["metrics=toyworld_spatial", "metrics.fid=null", f"samples_dir={summary['images_dir']}"],
    )
    results = evaluate(cfg)
    assert results["mask_iou_num_samples"] == 2
    assert 0.0 <= results["mask_iou"] <= 1.0
