"""Vanilla fine-tuning on SD3 (issue 24's toy Table 1 baseline): idgen-train model=tiny_sd3
module=baseline_finetune trains every transformer weight by flow matching on the fixed prompt's
SD3 features, exports ``transformer/`` that plain StableDiffusion3Pipeline takes, and
idgen-sample's ``baseline_model=`` samples it as that pipeline does. The baselines idgen does
not implement on SD3 are one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from idgen.baselines import load_baseline_pipeline
from idgen.baselines.methods import FullFinetune
from idgen.models import build_tiny_sd3, build_tiny_sdxl
from idgen.modules.baselines import BaselineModule
from idgen.preflight import validate_sample, validate_train
from idgen.train import train
from idgen.utils.validation import UserInputError
from tests.conftest import compose_config, job_config

FAST = [
    "experiment=demo",
    "model=tiny_sd3",
    "stage=finetune",
    "module=baseline_finetune",
    "data.num_images=4",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "module.optimizer.lr=5e-2",  # large steps, so two of them visibly change the images
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
]
PROMPT = "a photo of coloured shapes on a dark background"  # the demo's training prompt
SAMPLE = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SAMPLE).images


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sd3_finetune")
    cfg = job_config("train", tmp, FAST)
    validate_train(cfg)
    train(cfg)
    return tmp / "run" / "baseline_model"


def test_sd3_finetune_export_loads_in_plain_stable_diffusion_3(export):
    assert (export / "transformer" / "config.json").is_file()
    assert not (export / "unet").exists()
    base = build_tiny_sd3(seed=0)
    before = _images(base)
    # plain diffusers: the base's parts with the exported transformer
    transformer = SD3Transformer2DModel.from_pretrained(export / "transformer")
    plain = StableDiffusion3Pipeline(
        **{**build_tiny_sd3(seed=0).components, "transformer": transformer}
    )
    got = _images(plain)
    assert np.abs(got - before).max() > 1e-3  # the fine-tuning is there
    loaded = load_baseline_pipeline(export, base)
    assert isinstance(loaded, StableDiffusion3Pipeline)
    np.testing.assert_allclose(_images(loaded), got, atol=1e-5)
    np.testing.assert_allclose(_images(base), before, atol=0)  # the base is left as it was
    with pytest.raises(ValueError, match="was trained on a sd3 base; this base is sdxl"):
        load_baseline_pipeline(export, build_tiny_sdxl(seed=0))


def test_sd3_finetune_predicts_with_the_sd3_conditioning(tmp_path):
    """The module's prediction is the SD3 transformer's on StableDiffusion3Pipeline.encode_prompt's
    joint tokens and pooled vector, and its loss is the flow-matching one."""
    module = BaselineModule(
        model_loader=lambda: build_tiny_sd3(seed=0),
        optimizer=torch.optim.AdamW,
        method=FullFinetune(),
        domain="shapes",
        output_dir=str(tmp_path),
    )
    module.setup("fit")
    assert module.objective == "flow_matching"
    assert isinstance(module.unet, SD3Transformer2DModel)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    ref = build_tiny_sd3(seed=0)
    with torch.no_grad():
        got = module.denoiser()(noisy, t)
        embeds, _, pooled, _ = ref.encode_prompt(
            module.prompt, module.prompt, module.prompt, do_classifier_free_guidance=False
        )
        expected = ref.transformer(
            hidden_states=noisy,
            encoder_hidden_states=embeds.expand(2, -1, -1),
            pooled_projections=pooled.expand(2, -1),
            timestep=t,
        ).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # every transformer weight trains; the text encoders and VAE stay frozen
    trainable = module.trainable_parameters()
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in ref.transformer.parameters())


def test_sd3_baseline_samples_through_idgen_sample_as_its_pipeline(export, tmp_path):
    """``idgen-sample model=tiny_sd3 sampler=cfg baseline_model=<export>``'s components sample
    what StableDiffusion3Pipeline over the export samples (same seed, same scheduler)."""
    from idgen.pipelines import InDomainSD3Pipeline
    from idgen.sampling import SamplerSettings
    from idgen.sampling.components import load_components

    cfg = compose_config(
        "sample",
        tmp_path,
        ["model=tiny_sd3", "sampler=cfg", f"baseline_model={export}", "prompts=['a cat']"],
    )
    validate_sample(cfg)  # the family implements baseline sampling: no error
    base = build_tiny_sd3(seed=0)
    parts = load_components(base, SamplerSettings(baseline_mode="pipeline"), str(export))
    ours = InDomainSD3Pipeline.from_sd(parts.base)
    got = ours(
        PROMPT,
        w_d=0,
        w_c=5.0,
        weights="fixed",
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=3,
        output_type="np",
    ).images
    own = _images(load_baseline_pipeline(export, build_tiny_sd3(seed=0)))
    np.testing.assert_allclose(got, own, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "oft", "textual_inversion"])
def test_sd3_baselines_not_implemented_are_one_line(tmp_path, name):
    cfg = compose_config(
        "train", tmp_path, ["experiment=demo", "model=tiny_sd3", f"module=baseline_{name}"]
    )
    with pytest.raises(UserInputError, match=r"module\.method='.*' needs .*not yet for sd3"):
        validate_train(cfg)
    assert not (tmp_path / "run" / "baseline_model").exists()


def test_sd3_rectified_baseline_sampling_is_one_line(export, tmp_path):
    cfg = compose_config(
        "sample",
        tmp_path,
        ["model=tiny_sd3", "sampler=rectify", f"baseline_model={export}", "prompts=['a cat']"],
    )
    with pytest.raises(UserInputError, match=r"sampler\.baseline_mode='rectify' needs"):
        validate_sample(cfg)
