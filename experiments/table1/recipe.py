"""Stages of the toy Table 1 (paper §4.4), each through idgen-train / idgen-sample / idgen-eval.

Every stage calls the CLI's own function on the config the CLI would compose
(``idgen.toyworld.job.compose_run``), so a stage here is exactly a command line:

- train:  ``idgen-train experiment=toyworld`` (ours) or ``experiment=toyworld_<baseline>``
  (same domain folder, batch and steps for every method; the method's own learning rate);
- sample: ``idgen-sample`` with ``model=toyworld`` and ``sampler=cfg`` (base, baselines via
  ``baseline_model=``), ``sampler=decoupled`` (ours), and ``sampler=controlnet_toyworld``
  (the toy ControlNet in the control term, for every row);
- eval:   ``idgen-eval metrics=toyworld`` / ``metrics=toyworld_spatial`` against the domain
  folder, into ``<out>/table/<method>/<column>/metrics.json`` (experiments/aggregate_table1.py's
  layout).

Baselines are prompted with their template ``a photo of [V] <domain>`` (``[V]`` = the token they
learned, none for fine-tuning, LoRA, OFT), the domain words replaced by the colour/shape caption
for the text and spatial columns, as the paper appends attributes to the template.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from idgen.toyworld.job import (
    budget,
    common_overrides,
    compose_run,
    model_overrides,
    training_overrides,
)

log = logging.getLogger("table1")

# row -> the experiment that trains it (None: the base, not trained); the paper's row order.
EXPERIMENTS: dict[str, str | None] = {
    "base": None,
    "textual_inversion": "toyworld_textual_inversion",
    "custom_diffusion": "toyworld_custom_diffusion",
    "oft": "toyworld_oft",
    "finetune": "toyworld_finetune",
    "finetune_lora": "toyworld_lora",
    "ours": "toyworld",
}
ROWS = list(EXPERIMENTS)
COLUMNS = ("fidelity", "text_align", "spatial_align")


@dataclass
class Trained:
    """One row's model: export folder (None for the base), #param, prompt template, budget."""

    name: str
    folder: Path | None
    num_params: int
    template: str | None = None  # a baseline's training prompt, e.g. "a photo of <v> a shape"
    domain: str | None = None  # the words of the template that name the domain
    budget: dict | None = None


# --- training -----------------------------------------------------------------------------------
def train(args: argparse.Namespace, name: str) -> Trained:
    """``idgen-train experiment=<row's experiment>`` into ``<out>/<name>``; skipped when exported."""
    from idgen.train import train as train_cli

    experiment = EXPERIMENTS[name]
    if experiment is None:
        return Trained(name, None, 0)
    run_dir = args.out.resolve() / name
    overrides = training_overrides(args, experiment)  # the toy base (or --base) included
    if name == "ours" and args.inversion_steps is not None:
        overrides.append(f"inversion_steps={args.inversion_steps}")
    cfg = compose_run("train", run_dir, overrides)
    export = run_dir / ("domain_model" if name == "ours" else "baseline_model")
    done = export / ("config.json" if name == "ours" else "idgen_baseline.json")
    if done.is_file():
        log.info("%s: %s exists, training skipped", name, export)
    else:
        train_cli(cfg)
    if (run_dir / "config.yaml").is_file():
        # The budget it was trained with (a resumed table may run on edited configs).
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
    if name == "ours":
        from idgen.models import NullTextUNet

        params = sum(p.numel() for p in NullTextUNet.from_pretrained(export).parameters())
        return Trained(name, export, params, budget=budget(cfg))
    meta = json.loads((export / "idgen_baseline.json").read_text())
    return Trained(
        name,
        export,
        int(meta["trainable_params"]),
        template=str(meta["prompt"]),
        domain=str(cfg.domain),
        budget=budget(cfg),
    )


# --- prompts ------------------------------------------------------------------------------------
def method_prompt(caption: str | None, trained: Trained) -> str:
    """The prompt a row is sampled with for ``caption`` (None: the domain itself).

    Base and ours take the caption as it is ("" for the domain); a baseline takes its template,
    the domain words replaced by the caption: ``a photo of <v> a red circle``.
    """
    if trained.template is None:
        return caption or ""
    if caption is None:
        return trained.template
    if not trained.domain or trained.domain not in trained.template:
        raise ValueError(
            f"{trained.name}: its prompt {trained.template!r} does not contain the domain "
            f"{trained.domain!r}; cannot place the caption {caption!r} in it."
        )
    return trained.template.replace(trained.domain, caption, 1)


# --- sampling -----------------------------------------------------------------------------------
def sampler_overrides(args: argparse.Namespace, trained: Trained, spatial: bool) -> list[str]:
    """Which models and guidance a row samples with (the same weights for every row)."""
    sampler = "controlnet_toyworld" if spatial else "cfg"
    overrides = [
        *model_overrides(args),  # the SD1.5 toy base, or --base
        f"sampler={'decoupled' if trained.name == 'ours' and not spatial else sampler}",
        "sampler.weights=fixed",
        f"sampler.w_c={args.w_c}",
        f"sampler.w_d={args.w_d if trained.name == 'ours' else 0.0}",
        f"sampler.num_inference_steps={args.sample_steps}",
    ]
    if args.controlnet is not None and spatial:
        overrides.append(f"sampler.controlnet={Path(args.controlnet).resolve()}")
    if trained.name == "ours":
        overrides.append(f"domain_model={trained.folder}")
    elif trained.folder is not None:
        overrides.append(f"baseline_model={trained.folder}")  # its UNet (and [V]) in every term
    return overrides


def sample(
    args: argparse.Namespace,
    trained: Trained,
    run_dir: Path,
    prompts: Sequence[str],
    per_prompt: int,
    control_image: Path | None = None,
) -> Path:
    """``idgen-sample`` into ``run_dir`` (resumes); returns the image folder."""
    from idgen.sample import sample as sample_cli

    quoted = ",".join("'" + p.replace("'", "\\'") + "'" for p in prompts)
    overrides = [
        *sampler_overrides(args, trained, spatial=control_image is not None),
        *common_overrides(args),
        f"prompts=[{quoted}]",
        f"images_per_prompt={per_prompt}",
        f"batch_size={args.batch_size}",
        "grids=false",  # the eval folders are searched recursively: images only
        "+trainer.enable_progress_bar=false",
    ]
    if control_image is not None:
        overrides.append(f"sampler.control_image={control_image}")
    summary = sample_cli(compose_run("sample", run_dir, overrides))
    return Path(summary["images_dir"])


# --- evaluation ---------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace, name: str, column: str, samples_dir: Path) -> dict:
    """``idgen-eval`` of one column's samples against the domain folder."""
    from idgen.evaluate import evaluate as evaluate_cli

    out = args.out.resolve()
    overrides = [
        f"metrics={'toyworld_spatial' if column == 'spatial_align' else 'toyworld'}",
        *common_overrides(args),
        f"samples_dir={samples_dir}",
        f"reference_dir={out / 'domain'}",
        "device=cpu",
        "~logger",
    ]
    return evaluate_cli(compose_run("eval", out / "table" / name / column, overrides))


def ensure_domain(args: argparse.Namespace) -> Path:
    """The domain folder every method trains on and FID compares with (rendered once)."""
    from hydra.utils import instantiate

    cfg = compose_run("train", args.out.resolve() / "data", training_overrides(args, "toyworld"))
    instantiate(cfg.data).prepare_data()
    return Path(cfg.data.root)
