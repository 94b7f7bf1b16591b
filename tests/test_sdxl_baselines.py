"""Table-1 baselines on SDXL (issue 21 item 5): fine-tuning, LoRA and OFT train through idgen-train
model=tiny_sdxl with SDXL's conditioning (both encoders' features, the pooled vector, each
image's time_ids) and export folders that plain StableDiffusionXLPipeline loads (the UNet folder;
the LoRA through load_lora_weights, OFT through peft) giving the trained model's images."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from idgen.baselines import load_baseline_pipeline
from idgen.baselines.methods import OFT, FullFinetune
from idgen.models import build_tiny_sd, build_tiny_sdxl
from idgen.modules.baselines import BaselineModule
from idgen.preflight import validate_train
from idgen.train import train
from idgen.utils.validation import UserInputError
from tests.conftest import compose_config, job_config

FAST = [
    "experiment=demo",
    "model=tiny_sdxl",
    "stage=finetune",
    "data.num_images=4",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "module.optimizer.lr=5e-2",  # large steps, so two of them visibly change the images
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
]
SAMPLE = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
PROMPT = "a photo of coloured shapes on a dark background"  # the demo's training prompt


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SAMPLE).images


@pytest.fixture(scope="module", params=["finetune", "lora", "oft"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    """``idgen-train model=tiny_sdxl module=baseline_<method> stage=finetune`` (2 steps)."""
    tmp = tmp_path_factory.mktemp(f"sdxl_{request.param}")
    cfg = job_config("train", tmp, [*FAST, f"module=baseline_{request.param}"])
    validate_train(cfg)
    train(cfg)
    return request.param, tmp / "run"


def _trained_unet(method: str, run: Path) -> UNet2DConditionModel:
    """The trained UNet rebuilt from the run's checkpoint (not from the export): the frozen
    tiny SDXL UNet plus the checkpoint's trained tensors (peft LoRA layers added for LoRA)."""
    from peft import LoraConfig

    unet = build_tiny_sdxl(seed=0).unet
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    trained = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    assert trained
    if method == "lora":  # conf/module/baseline_lora.yaml's adapter
        unet.add_adapter(
            LoraConfig(r=1, lora_alpha=1.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
    if method == "oft":  # conf/module/baseline_oft.yaml's adapter
        unet.add_adapter(OFT(r=4).peft_config())
    missing, unexpected = unet.load_state_dict(trained, strict=False)
    assert not unexpected
    return unet


def test_sdxl_baseline_export_loads_in_plain_sdxl_pipeline(trained):
    method, run = trained
    export = run / "baseline_model"
    base = build_tiny_sdxl(seed=0)
    before = _images(base)
    if method == "finetune":
        unet = UNet2DConditionModel.from_pretrained(export / "unet")
        plain = StableDiffusionXLPipeline(**{**build_tiny_sdxl(seed=0).components, "unet": unet})
    elif method == "lora":
        plain = build_tiny_sdxl(seed=0)
        assert isinstance(plain, StableDiffusionXLPipeline)
        plain.load_lora_weights(export)
    else:  # what a user without idgen writes for a peft OFT adapter
        from peft import OFTConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        plain = build_tiny_sdxl(seed=0)
        plain.unet.add_adapter(OFTConfig.from_pretrained(export))
        set_peft_model_state_dict(plain.unet, load_file(export / "adapter_model.safetensors"))
    got = _images(plain)
    reference = StableDiffusionXLPipeline(
        **{**build_tiny_sdxl(seed=0).components, "unet": _trained_unet(method, run)}
    )
    np.testing.assert_allclose(got, _images(reference), atol=1e-5)
    assert np.abs(got - before).max() > 1e-3  # the adaptation is there
    # idgen's own loader gives the same pipeline class and images, and leaves the base as it was
    loaded = load_baseline_pipeline(export, base)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    np.testing.assert_allclose(_images(loaded), got, atol=1e-5)
    np.testing.assert_allclose(_images(base), before, atol=0)
    with pytest.raises(ValueError, match="was trained on a sdxl base; this base is sd15"):
        load_baseline_pipeline(export, build_tiny_sd(seed=0))


def test_sdxl_baseline_predicts_with_the_sdxl_conditioning(tmp_path):
    """The module's prediction is the SDXL UNet's on StableDiffusionXLPipeline.encode_prompt's
    features and pooled vector, with each image's own time_ids from the batch."""
    sdxl = build_tiny_sdxl(seed=0)
    module = BaselineModule(
        model_loader=lambda: sdxl,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        method=FullFinetune(),
        domain="shapes",
        output_dir=str(tmp_path),
    )
    module.setup("fit")
    batch = {
        "original_size": torch.tensor([[64, 64], [128, 96]]),
        "crop_top_left": torch.tensor([[0, 0], [8, 4]]),
        "target_size": torch.tensor([[64, 64], [64, 64]]),
    }
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        got = module.denoiser_for(batch)(noisy, t)
        ref = build_tiny_sdxl(seed=0)
        embeds, _, pooled, _ = ref.encode_prompt(module.prompt, do_classifier_free_guidance=False)
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 4, 64, 64]])
        expected = ref.unet(
            noisy,
            t,
            encoder_hidden_states=embeds.expand(2, -1, -1),
            added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": ids},
        ).sample
        same_ids = module.denoiser_for({k: v[:1].expand(2, 2) for k, v in batch.items()})(noisy, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got[1] - same_ids[1]).abs().max() > 1e-5  # the second image's time_ids mattered


@pytest.mark.parametrize("name", ["textual_inversion", "custom_diffusion"])
def test_sdxl_baselines_learning_a_token_are_one_line(tmp_path, name):
    cfg = compose_config(
        "train", tmp_path, ["experiment=demo", "model=tiny_sdxl", f"module=baseline_{name}"]
    )
    with pytest.raises(UserInputError, match=r"module\.method='.*' needs a baseline that learns"):
        validate_train(cfg)
    assert not (tmp_path / "run" / "baseline_model").exists()


def _split_unet(base_unet, baseline_unet):
    """A UNet for StableDiffusionXLPipeline's CFG batch [uncond; cond]: the frozen base on the
    unconditional half, the baseline on the conditional half (unconditional rectification,
    paper §4.5, written against diffusers' own CFG loop)."""
    import copy

    unet = copy.deepcopy(base_unet)

    def forward(x, t, encoder_hidden_states, added_cond_kwargs, **kw):
        n = x.shape[0] // 2
        half = [slice(0, n), slice(n, None)]
        outs = []
        for model, rows in zip((base_unet, baseline_unet), half, strict=True):
            added = {k: v[rows] for k, v in added_cond_kwargs.items()}
            outs.append(
                model(x[rows], t, encoder_hidden_states[rows], added_cond_kwargs=added, **kw)[0]
            )
        return (torch.cat(outs),)

    unet.forward = forward
    return unet


def test_sdxl_baseline_sampling_pipeline_and_rectified(trained):
    """baseline_model= on SDXL: the export's pipeline samples as itself (sampler=cfg), and
    rectified sampling (sampler=rectify) is CFG with the frozen base's unconditional prediction."""
    from idgen.pipelines import InDomainXLPipeline, make_scheduler
    from idgen.sampling import SamplerSettings
    from idgen.sampling.components import load_components

    method, run = trained
    export = str(run / "baseline_model")
    kw = dict(num_inference_steps=3, output_type="np")
    base = build_tiny_sdxl(seed=0)
    parts = load_components(base, SamplerSettings(baseline_mode="pipeline"), export)
    ours = InDomainXLPipeline.from_sd(parts.base, scheduler=make_scheduler(base.scheduler.config))
    got = ours(
        PROMPT, w_d=0, w_c=5.0, weights="fixed", generator=torch.Generator().manual_seed(0), **kw
    )
    baseline = load_baseline_pipeline(export, build_tiny_sdxl(seed=0))
    baseline.scheduler = make_scheduler(base.scheduler.config)
    own = _images(baseline)
    np.testing.assert_allclose(got.images, own, atol=1e-5)

    settings = SamplerSettings(
        baseline_mode="rectify", extra_guidance=[{"name": "community", "weight": 5.0}]
    )
    parts = load_components(base, settings, export)
    assert parts.base is base
    ours = InDomainXLPipeline.from_sd(base, scheduler=make_scheduler(base.scheduler.config))
    rect = ours(
        PROMPT,
        w_d=0,
        w_c=0,
        weights="fixed",
        extra_guidance=parts.extra_terms([PROMPT]),
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    ref = StableDiffusionXLPipeline(
        **{
            **build_tiny_sdxl(seed=0).components,
            "unet": _split_unet(build_tiny_sdxl(seed=0).unet, baseline.unet),
            "scheduler": make_scheduler(base.scheduler.config),
        }
    )
    np.testing.assert_allclose(rect, _images(ref), atol=1e-5)
    assert np.abs(rect - own).max() > 1e-4  # the frozen base's unconditional prediction mattered
