"""idgen-train: compose the config, prepare the data, and train the domain model."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from idgen import CONFIG_DIR
from idgen.data.transforms import to_pil
from idgen.preview import write_base_grid
from idgen.utils.images import make_grid
from idgen.utils.io import atomic_write_text, save_image_atomic

log = logging.getLogger(__name__)


def prepare_data(cfg: DictConfig, output_dir: Path) -> L.LightningDataModule:
    """Instantiate the DataModule, scan the folder, write the manifest and a grid of real images."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info(
        "data: %d training images (%d skipped) from %s at %dpx",
        len(datamodule.train_files),
        len(datamodule.skipped),
        datamodule.root,
        datamodule.resolution,
    )
    if rank_zero_only.rank == 0:
        dataset = datamodule.train_dataset
        dataset.transform = datamodule.val_dataset.transform  # no flips in the overview grid
        n = min(16, len(dataset))
        batch = [to_pil(dataset[i]["pixel_values"]) for i in range(n)]
        save_image_atomic(make_grid(batch), output_dir / "data_grid.png")
    return datamodule


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the configured stages; returns the final metrics (for sweepers)."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    datamodule = prepare_data(cfg, output_dir)
    sd_loader = instantiate(cfg.model)

    if cfg.preview.enabled and rank_zero_only.rank == 0:
        write_base_grid(
            sd_loader,
            output_dir / "base_grid.png",
            prompts=list(cfg.preview.prompts),
            resolution=cfg.preview.resolution,
            num_inference_steps=cfg.preview.num_inference_steps,
            guidance_scale=cfg.preview.guidance_scale,
            seed=cfg.preview.seed,
        )
    del datamodule
    log.info("train: feature inversion and null-text fine-tuning arrive with issue 3")
    return {}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
