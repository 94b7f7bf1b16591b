"""idgen-eval's ``sample:`` hook speaks idgen-sample's command line; prompts found in its index."""

from __future__ import annotations

import json

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from idgen.evaluate import sample_overrides
from idgen.metrics.evaluation import sample_prompts
from tests.conftest import compose_config


def test_hook_overrides_compose_in_idgen_sample(tmp_path):
    hook = OmegaConf.create(
        {"overrides": ["images_per_prompt=3"], "images_subdir": "imgs", "w_d": 1.5, "w_c": 2.5}
    )
    overrides = sample_overrides(hook, tmp_path / "run")
    assert overrides[-1] == f"hydra.run.dir={tmp_path / 'run'}"
    # every override but hydra's own must be a valid idgen-sample override (unknown keys fail)
    cfg = compose_config("sample", tmp_path, overrides[:-1])
    settings = instantiate(cfg.sampler)
    assert (settings.w_d, settings.w_c) == (1.5, 2.5)
    assert cfg.images_subdir == "imgs" and cfg.images_per_prompt == 3


def test_prompts_from_samples_jsonl_beside_the_image_folder(tmp_path):
    """idgen-sample writes samples.jsonl into its run dir, the images into run/samples."""
    images = tmp_path / "run" / "samples"
    images.mkdir(parents=True)
    records = []
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        name = f"p{i:04d}_{i:06d}.png"
        # plain PNGs without text chunks: the prompt can only come from the index
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / name)
        records.append({"file": f"samples/{name}", "prompt": prompt})
    (tmp_path / "run" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = sorted(images.glob("*.png"))
    assert sample_prompts(images, paths) == ["a red circle", "a blue square"]
