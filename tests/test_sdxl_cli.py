"""model=tiny_sdxl through idgen-train (both stages, validation grids, export) and idgen-sample,
and the one-line errors for a model of the other family (no other change to the commands)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from idgen.models import NullTextUNet, build_tiny_sdxl
from idgen.modules.sd_parts import load_pooled_features
from idgen.sample import sample
from idgen.train import train
from idgen.utils.validation import UserInputError
from tests.conftest import compose_config, job_config

FAST = [
    "experiment=demo",
    "model=tiny_sdxl",
    "data.num_images=8",
    "data.batch_size=4",
    "inversion_steps=2",
    "trainer.max_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.decoupled_sampling.every_n_train_steps=2",
    "callbacks.decoupled_sampling.settings.num_inference_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sdxl_train")
    train(job_config("train", tmp, FAST))
    return tmp / "run"


def test_train_tiny_sdxl_runs_both_stages(trained):
    # stage 1 kept the pooled features; stage 2 exported an SDXL null-text UNet; the base
    # preview and the validation grids were drawn with the SDXL pipelines
    assert load_pooled_features(trained / "inversion" / "text_features.safetensors").shape == (
        1,
        32,
    )
    unet = NullTextUNet.from_pretrained(trained / "domain_model")
    assert unet.pooled_embedding is not None
    assert (trained / "base_grid.png").is_file()
    assert sorted((trained / "validation").glob("step_0000002_*.png"))


def test_sample_tiny_sdxl_with_the_domain_model(tmp_path, trained):
    cfg = compose_config(
        "sample",
        tmp_path,
        [
            "model=tiny_sdxl",
            f"domain_model={trained / 'domain_model'}",
            "prompts=[a photo of a cat]",
            "images_per_prompt=2",
            "batch_size=2",
            "sampler.num_inference_steps=2",
        ],
    )
    summary = sample(cfg)
    images = sorted((Path(cfg.paths.output_dir) / "samples").glob("*.png"))
    assert summary["num_images"] == 2 and len(images) == 2
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)


def test_other_family_is_one_line_before_loading(tmp_path, trained):
    # an SDXL domain model with the SD1.5 tiny base
    cfg = compose_config(
        "sample", tmp_path, ["model=tiny", f"domain_model={trained / 'domain_model'}"]
    )
    with pytest.raises(UserInputError, match="model family sdxl \\(base model: sd15\\)"):
        sample(cfg)
    # an SDXL folder given as model=sd15
    build_tiny_sdxl().save_pretrained(tmp_path / "xl")
    cfg = compose_config("sample", tmp_path, ["model=sd15", f"model.pretrained={tmp_path / 'xl'}"])
    with pytest.raises(UserInputError, match="is a sdxl folder .*use model=sdxl"):
        sample(cfg)


@pytest.mark.parametrize(
    ("config", "overrides", "named"),
    [
        (
            "train",
            ["experiment=demo", "module=baseline_textual_inversion"],
            "module.method='TextualInversion'",
        ),
    ],
)
def test_what_sdxl_lacks_yet_is_one_line(tmp_path, config, overrides, named):
    from idgen import preflight

    cfg = compose_config(config, tmp_path, [*overrides, "model=tiny_sdxl"])
    validate = {"train": preflight.validate_train, "sample": preflight.validate_sample}[config]
    with pytest.raises(UserInputError, match=f"{named}.*not yet for sdxl"):
        validate(cfg)


def test_controlnet_of_the_other_family_is_one_line(tmp_path):
    from diffusers import ControlNetModel

    from idgen import preflight
    from idgen.models import build_tiny_sd

    ControlNetModel.from_unet(build_tiny_sd().unet).save_pretrained(tmp_path / "cn15")
    overrides = ["sampler=controlnet", f"sampler.controlnet={tmp_path / 'cn15'}"]
    cfg = compose_config(
        "sample", tmp_path, [*overrides, "sampler.control_image=/x.png", "model=tiny_sdxl"]
    )
    with pytest.raises(
        UserInputError, match="is a ControlNet of a sd15 model, but the base is sdxl"
    ):
        preflight.validate_sample(cfg)
