"""Table 1 recipe steps: train a method, sample it with fixed seeds, evaluate the samples.

Every method trains on the same domain folder with the same step budget and batch size, samples
with the same seeds and scheduler (DPM-Solver++), and is scored by idgen's metrics. Baselines
sample with standard CFG on their template prompt ``a photo of [V] <domain>``; ours with the
decoupled guidance of InDomainPipeline (automatic weights).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from idgen import CONFIG_DIR
from idgen.baselines import load_baseline_pipeline
from idgen.baselines.sampling import sample_baseline, with_scheduler
from idgen.data import DomainImageDataModule
from idgen.metrics import Attribute, list_images
from idgen.metrics.evaluation import evaluate_folder
from idgen.metrics.results import write_metrics
from idgen.models import NullTextUNet
from idgen.modules import NullTextFinetuneModule, TextFeatureInversionModule
from idgen.pipelines.in_domain import InDomainPipeline
from idgen.utils.io import save_image_atomic

log = logging.getLogger(__name__)

# row name (as in experiments/aggregate_table1.py) -> conf/module option
BASELINES = {
    "textual_inversion": "baseline_textual_inversion",
    "custom_diffusion": "baseline_custom_diffusion",
    "oft": "baseline_oft",
    "finetune": "baseline_finetune",
    "finetune_lora": "baseline_lora",
}
ROWS = [*BASELINES, "ours"]


@dataclass
class Budget:
    steps: int
    inversion_steps: int
    batch_size: int
    resolution: int
    lr_ours: float = 1e-5


@dataclass
class Trained:
    """A trained method: its export folder, #param and the prompt it was trained with."""

    name: str
    folder: Path
    num_params: int
    prompt: str
    token: str | None = None


def _trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _data(domain: Path, budget: Budget, seed: int) -> DomainImageDataModule:
    return DomainImageDataModule(
        root=str(domain),
        resolution=budget.resolution,
        batch_size=budget.batch_size,
        random_flip=True,
        seed=seed,
    )


def train_baseline(
    name: str,
    loader: Callable[[], Any],
    domain: Path,
    domain_name: str,
    budget: Budget,
    out: Path,
    seed: int = 0,
) -> Trained:
    """Train one baseline from its ``conf/module`` config (same hyper-parameters as idgen-train)."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "module" / f"{BASELINES[name]}.yaml")
    del cfg["model_loader"]
    cfg.domain, cfg.output_dir, cfg.seed, cfg.base_model = domain_name, str(out), seed, "table1"
    module = instantiate(cfg, model_loader=loader)
    _trainer(out, budget.steps).fit(module, datamodule=_data(domain, budget, seed))
    return Trained(
        name, module.export_path, module.num_trainable_params, module.prompt, module.method.token
    )


def train_ours(
    loader: Callable[[], Any],
    domain: Path,
    domain_name: str,
    budget: Budget,
    out: Path,
    seed: int = 0,
) -> Trained:
    """Stage 1 (text-feature inversion) then stage 2 (null-text UNet fine-tuning)."""
    inversion = TextFeatureInversionModule(
        model_loader=loader,
        optimizer=functools.partial(torch.optim.AdamW, lr=5e-3, weight_decay=0.0),
        domain=domain_name,
        output_dir=str(out / "inversion"),
        seed=seed,
    )
    _trainer(out / "inversion", budget.inversion_steps).fit(
        inversion, datamodule=_data(domain, budget, seed)
    )
    finetune = NullTextFinetuneModule(
        model_loader=loader,
        optimizer=functools.partial(torch.optim.AdamW, lr=budget.lr_ours, weight_decay=1e-2),
        text_features=str(inversion.features_path),
        domain=domain_name,
        val_every_n_steps=None,
        output_dir=str(out),
        seed=seed,
    )
    _trainer(out, budget.steps).fit(finetune, datamodule=_data(domain, budget, seed))
    params = sum(p.numel() for p in finetune.trainable_parameters())
    return Trained("ours", finetune.export_path, params, f"a photo of {domain_name}")


# --- prompts ------------------------------------------------------------------------------------
def method_prompt(prompt: str, trained: Trained, domain_name: str) -> str:
    """The prompt a method is sampled with: ``[V]`` before the domain name where one was learned."""
    if trained.token is None or domain_name not in prompt:
        return prompt
    return prompt.replace(domain_name, f"{trained.token} {domain_name}", 1)


def default_attributes(domain_name: str) -> list[Attribute]:
    """Colour attributes for the demo domain (coloured shapes)."""
    colours = ["red", "green", "blue", "yellow"]
    return [
        Attribute(
            prompt=f"a photo of {domain_name}, {c}",
            positive=f"a photo of a {c} shape",
            negative=f"a photo of a {colours[(i + 1) % 4]} shape",
        )
        for i, c in enumerate(colours)
    ]


# --- sampling -----------------------------------------------------------------------------------
@dataclass
class Sampling:
    num_inference_steps: int
    guidance_scale: float
    rectify: bool = False


def _save(image: Image.Image, path: Path, prompt: str, seed: int, method: str) -> None:
    save_image_atomic(image, path, {"prompt": prompt, "seed": str(seed), "method": method})


def _ours_pipe(trained: Trained, sd, controlnet=None) -> InDomainPipeline:
    domain_unet = NullTextUNet.from_pretrained(trained.folder).to(sd.unet.device)
    return InDomainPipeline.from_sd(sd, domain_unet=domain_unet, controlnet=controlnet)


def sample_text(
    trained: Trained,
    sd,
    jobs: Sequence[tuple[str, str, int]],
    folder: Path,
    how: Sampling,
    domain_name: str,
) -> Path:
    """``jobs``: (file stem, prompt recorded for the metrics, seed); one image each."""
    if trained.name == "ours":
        pipe = _ours_pipe(trained, sd)
        for stem, prompt, seed in jobs:
            image = pipe(
                prompt,
                w_d=None,
                w_c=None if prompt else 0,
                num_inference_steps=how.num_inference_steps,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            _save(image, folder / f"{stem}.png", prompt, seed, trained.name)
        return folder
    pipe = load_baseline_pipeline(trained.folder, sd)
    for stem, prompt, seed in jobs:
        text = method_prompt(prompt or trained.prompt, trained, domain_name)
        if not prompt:
            text = trained.prompt  # "unconditional" for a baseline = its template prompt
        (image,) = sample_baseline(
            pipe,
            [text],
            [seed],
            guidance_scale=how.guidance_scale,
            num_inference_steps=how.num_inference_steps,
            rectify_with=sd if how.rectify else None,
        )
        _save(image, folder / f"{stem}.png", prompt, seed, trained.name)
    return folder


def write_canny_conditions(domain: Path, folder: Path, count: int, resolution: int) -> Path:
    """Canny maps (OpenCV 100/200, white on black) of the first ``count`` domain images."""
    for path in list_images(domain)[:count]:
        image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        edges = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), 100, 200)
        save_image_atomic(Image.fromarray(edges).convert("RGB"), folder / f"{path.stem}.png")
    return folder


def sample_canny(
    trained: Trained,
    sd,
    controlnet,
    conditions: Path,
    folder: Path,
    how: Sampling,
    domain_name: str,
    seed: int = 0,
) -> Path:
    """One ControlNet sample per condition, named like it (idgen's canny metric pairs by stem)."""
    from diffusers import StableDiffusionControlNetPipeline

    if trained.name == "ours":
        pipe = _ours_pipe(trained, sd, controlnet)
    else:
        base = with_scheduler(load_baseline_pipeline(trained.folder, sd))
        pipe = StableDiffusionControlNetPipeline(
            **{k: v for k, v in base.components.items() if k not in ("image_encoder",)},
            controlnet=controlnet,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
    for i, cond_path in enumerate(list_images(conditions)):
        cond = Image.open(cond_path).convert("RGB")
        generator = torch.Generator().manual_seed(seed + i)
        if trained.name == "ours":
            image = pipe(
                trained.prompt,
                control_image=cond,
                num_inference_steps=how.num_inference_steps,
                generator=generator,
            ).images[0]
        else:
            image = pipe(
                trained.prompt,
                image=cond,
                guidance_scale=how.guidance_scale,
                num_inference_steps=how.num_inference_steps,
                generator=generator,
            ).images[0]
        _save(image, folder / f"{cond_path.stem}.png", trained.prompt, seed + i, trained.name)
    return folder


# --- evaluation ---------------------------------------------------------------------------------
def evaluate_column(samples: Path, run_dir: Path, **metric_kwargs) -> dict:
    """idgen's metrics of one sample folder; metrics.json in ``run_dir`` (aggregate_table1 layout)."""
    results = evaluate_folder(samples, **metric_kwargs)
    write_metrics(run_dir, results)
    return results
