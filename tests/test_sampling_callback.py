"""DecoupledGuidanceSampling through Trainer.predict (the README example, run as written) and
during fine-tuning (validation grids with decoupled guidance, equal to what predict samples)."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from idgen.models import NullTextUNet, build_tiny_sd
from idgen.modules import NullTextFinetuneModule
from idgen.pipelines import InDomainPipeline
from idgen.sampling import (
    PARAMS_KEY,
    DecoupledGuidanceSampling,
    PromptsDataModule,
    SamplerSettings,
)
from idgen.toyworld.demo import DemoDomainDataModule
from idgen.utils.images import make_grid
from tests.conftest import quiet_trainer, tiny_finetune_module

README = Path(__file__).resolve().parent.parent / "README.md"
PROMPT = "a photo of a red circle"


def _readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    marker = "<!-- tested: tests/test_sampling_callback.py runs this block -->"
    assert marker in text, "the README's DecoupledGuidanceSampling example lost its marker"
    match = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.S)
    return match.group(1)


def test_readme_predict_example_runs_as_written(tmp_path):
    sd = build_tiny_sd(seed=0)
    domain = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32), init="value")
    domain.save_pretrained(tmp_path / "domain_model")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example uses relative folders
    try:
        exec(compile(_readme_block(), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    pngs = sorted((tmp_path / "samples" / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["p0000_000000.png", "p0000_000001.png"]
    records = [json.loads(x) for x in (tmp_path / "samples" / "samples.jsonl").open()]
    assert [r["seed"] for r in records] == [0, 1]
    assert set(records[0]["guidance_weights"]) == {"domain", "control"}  # auto weights recorded
    assert [t["name"] for t in records[0]["terms"]] == ["domain", "control"]
    with Image.open(pngs[1]) as im:
        assert json.loads(im.text[PARAMS_KEY]) == records[1]


def _finetune_module(tmp_path, sd) -> NullTextFinetuneModule:
    return tiny_finetune_module(tmp_path / "out", sd, weight_decay=0.0, domain="shapes")


def test_validation_grids_use_decoupled_guidance_and_match_predict(tmp_path):
    """The callback attached to fit draws grids with the trained domain model and w_d, w_c on
    real prompts; predict with the same callback settings gives the same images."""
    settings = SamplerSettings(w_d=2.0, w_c=3.0, weights="fixed", num_inference_steps=3)
    sd = build_tiny_sd(seed=0)
    module = _finetune_module(tmp_path, sd)
    sampling = DecoupledGuidanceSampling(
        sd=functools.partial(build_tiny_sd, seed=0),
        settings=settings,
        out_dir=tmp_path / "fit",
        every_n_train_steps=2,
        val_prompts=[PROMPT],
        val_images_per_prompt=2,
    )
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="", version="")
    trainer = quiet_trainer(tmp_path, 2, callbacks=[sampling], logger=logger, limit_val_batches=0)
    data = DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=4, batch_size=2)
    trainer.fit(module, datamodule=data)

    (path,) = sorted((tmp_path / "fit" / "validation").glob("*.png"))
    assert path.name == "step_0000002_p0000.png"
    with Image.open(path) as png:
        grid, caption_chunk = np.asarray(png.convert("RGB")), png.text["caption"]
    # the grid says what it shows: the step and caption above, each image's seed under it
    captioned = {"title": f"step 2: {caption_chunk}", "labels": ["seed 0", "seed 1"]}

    # 1. Independently: the pipeline with the trained domain model, the same seeds and weights.
    pipe = InDomainPipeline.from_sd(build_tiny_sd(seed=0), domain_unet=module.domain_unet.eval())

    def images(w_d: float) -> list:
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe([PROMPT] * 2, w_d=w_d, w_c=3.0, num_inference_steps=3, generator=gens).images

    expected = np.asarray(make_grid(images(2.0), **captioned).convert("RGB"))
    assert np.abs(grid.astype(int) - expected.astype(int)).max() <= 1
    without_domain = np.asarray(make_grid(images(0.0), **captioned).convert("RGB"))
    assert np.abs(grid.astype(int) - without_domain.astype(int)).max() > 8  # w_d acts

    # 2. Logged with its caption (prompt, seeds, the weights given and used).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "validation/decoupled_grid/0" in events.Tags()["images"]
    (caption,) = events.Tensors("validation/decoupled_grid/0/text_summary")
    text = caption.tensor_proto.string_val[0].decode()
    assert text.startswith(f"{PROMPT} | seeds 0..1 | decoupled w_d=2.0, w_c=3.0")

    # 3. Predict with the fine-tuned module and the same callback settings: the same images.
    predict = DecoupledGuidanceSampling(
        sd=functools.partial(build_tiny_sd, seed=0), settings=settings, out_dir=tmp_path / "pred"
    )
    L.Trainer(
        accelerator="cpu", devices=1, callbacks=[predict], logger=False, enable_progress_bar=False
    ).predict(
        module,
        datamodule=PromptsDataModule([PROMPT], 2, seed=0, batch_size=2),
        return_predictions=False,
    )
    assert (tmp_path / "pred" / "grids" / "p0000_a-photo-of-a-red-circle.png").is_file()
    samples = sorted((tmp_path / "pred" / "samples").glob("*.png"))
    assert len(samples) == 2
    # the predicted images, laid out as the validation grid, are that grid pixel for pixel
    predicted = np.asarray(make_grid([Image.open(p) for p in samples], **captioned).convert("RGB"))
    assert np.array_equal(predicted, grid)


def test_callback_needs_a_prompt_plan(tmp_path):
    from torch.utils.data import DataLoader

    module = _finetune_module(tmp_path, build_tiny_sd(seed=0))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[DecoupledGuidanceSampling(sd=build_tiny_sd, out_dir=tmp_path)],
        logger=False,
    )
    with pytest.raises(ValueError, match="PromptsDataModule"):
        trainer.predict(module, dataloaders=DataLoader([{"prompt": "x"}], collate_fn=list))


def test_reuse_every_reaches_the_sampler_from_the_command_line(tmp_path):
    """sampler.domain_reuse_every=k composes into the domain term the pipeline receives."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config("sample", tmp_path, ["sampler.domain_reuse_every=3", "sampler.w_d=2.0"])
    settings: SamplerSettings = instantiate(cfg.sampler)
    kwargs = settings.pipeline_kwargs(settings.guidance_terms())
    domain, control = kwargs["guidance"]
    assert (domain.name, domain.model, domain.weight, domain.reuse_every) == (
        "domain",
        "domain_unet",
        2.0,
        3,
    )
    assert (control.name, control.weight, control.reuse_every) == ("control", "auto", 1)
    assert kwargs["num_inference_steps"] == 100 and kwargs["image"] is None


class _NaNModel(torch.nn.Module):
    """A text-free 'model' whose prediction is NaN (a diverged or overflowing model)."""

    dtype = torch.float32

    def forward(self, sample, timestep, return_dict=False):
        return (torch.full_like(sample, float("nan")),)


def test_non_finite_images_are_never_written(tmp_path):
    from idgen.guidance import GuidanceTerm
    from idgen.sampling import DomainModel

    sampling = DecoupledGuidanceSampling(
        sd=build_tiny_sd,
        terms=[GuidanceTerm("broken", model=_NaNModel(), weight=1.0)],
        settings=SamplerSettings(num_inference_steps=2),
        out_dir=tmp_path,
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[sampling], logger=False)
    with pytest.raises(FloatingPointError, match="non-finite pixels"):
        trainer.predict(
            DomainModel(None),
            datamodule=PromptsDataModule([PROMPT], 2, batch_size=2),
            return_predictions=False,
        )
    assert not list((tmp_path / "samples").glob("*.png"))
