"""idgen-3d: text-to-3D by score distillation with the multi-guidance mix (paper §4.3, Fig. 10).

    idgen-3d prompt='a red circle' model=toyworld scene=toyworld domain_model=<export>
    idgen-3d model=sd15 model.pretrained=<sd15 folder> domain_model=<export> scene=sd15 sds=sd15 device=cuda

A voxel NeRF (``idgen.scene``) is rendered from random orbit cameras and optimised with the SDS
loss of ``idgen.sds.MultiGuidanceSDS`` (domain term ``sds.w_d``, text term ``sds.w_c``;
``sds.w_d=0`` is plain CFG-SDS). Into the run dir: ``turntable.gif``, ``mesh.{obj,ply,glb}``,
``loss.png``, ``views.png`` (the evaluation views), ``metrics.json`` and ``checkpoints/last.pt``;
rerunning with the same ``hydra.run.dir`` resumes from the checkpoint (a finished run only
rewrites its outputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from idgen import CONFIG_DIR
from idgen.scene import (
    CameraSampler,
    VoxelNeRF,
    export_mesh,
    extract_mesh,
    init_from_mesh,
    lift_image,
    mesh_report,
)
from idgen.scene.report import to_frames, write_gif, write_loss_curve
from idgen.sds import MultiGuidanceSDS
from idgen.utils.dtypes import parse_optional_dtype
from idgen.utils.io import atomic_torch_save, atomic_write_text, save_image_atomic
from idgen.utils.task import console_main, task_wrapper

log = logging.getLogger(__name__)

# Config keys that decide the result: a checkpoint made with other values is not resumed.
_IDENTITY_KEYS = (
    "prompt",
    "negative_prompt",
    "model",
    "domain_model",
    "scene",
    "sds",
    "seed",
    "init",
)


def run_identity(cfg: DictConfig) -> str:
    """Hash of what decides the 3D result (``steps`` excluded: a longer run may resume)."""
    parts = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        if isinstance(cfg[k], DictConfig)
        else cfg[k]
        for k in _IDENTITY_KEYS
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_models(cfg: DictConfig) -> tuple[Any, Any]:
    """The frozen SD (``model`` group, loaded lazily here) and the optional domain model."""
    from idgen.models import NullTextUNet

    dtype = parse_optional_dtype(cfg.dtype, "dtype")
    sd = instantiate(cfg.model)()
    sd.to(cfg.device)
    if dtype is not None:
        # The VAE stays float32: SD1.5's VAE overflows in float16 (diffusers' upcast_vae).
        for module in (sd.unet, sd.text_encoder):
            module.to(dtype)
    domain = None
    if cfg.domain_model:
        path = Path(cfg.domain_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"domain_model={path}: no exported NullTextUNet there (config.json missing); "
                "export one with idgen-train (its domain_model/ folder) or set domain_model=null"
            )
        domain = NullTextUNet.from_pretrained(path).to(cfg.device, dtype or torch.float32)
        domain.eval()
    return sd, domain


def initialise(nerf: VoxelNeRF, init: DictConfig) -> dict:
    """Optional start from an image (lift) or a mesh; returns what was done (for metrics)."""
    if init.image and init.mesh:
        raise ValueError("init.image and init.mesh are exclusive; set one of them to null")
    if init.image:
        path = Path(init.image)
        if not path.is_file():
            raise FileNotFoundError(f"init.image={path} does not exist")
        info = lift_image(nerf, np.asarray(Image.open(path).convert("RGB")))
        return {"image": str(path), **info}
    if init.mesh:
        init_from_mesh(nerf, init.mesh)
        return {"mesh": str(init.mesh)}
    return {}


def target_colour(prompt: str) -> str | None:
    """The toy world's colour word in ``prompt`` (for the toy metrics), if any."""
    from idgen.toyworld import COLOURS

    words = prompt.lower().replace(",", " ").split()
    return next((c for c in COLOURS if c in words), None)


@torch.no_grad()
def evaluate_views(nerf: VoxelNeRF, cameras: CameraSampler, cfg: DictConfig) -> tuple[dict, Any]:
    """Renders from ``eval.num_views`` cameras around the object and, with ``eval.toyworld``,
    the toy world's pixel metrics of them (dark fraction, colour accuracy vs the prompt)."""
    views = cameras.turntable(cfg.eval.num_views, elevation=cfg.eval.elevation)
    rgb = nerf.render(views, cfg.scene.render_resolution).rgb
    metrics: dict[str, Any] = {"num_views": int(cfg.eval.num_views)}
    if cfg.eval.toyworld:
        from idgen.toyworld import score

        colour = target_colour(cfg.prompt)
        colours = None if colour is None else [colour] * len(views)
        metrics["toyworld"] = score(rgb, colours=colours)
        metrics["toyworld"]["target_colour"] = colour
    return metrics, rgb


def _grid_image(rgb: torch.Tensor, scale: int = 2) -> Image.Image:
    frames = to_frames(rgb, scale)
    return Image.fromarray(np.concatenate(list(frames), axis=1))


def text_to_3d(cfg: DictConfig) -> dict[str, Any]:
    """Optimise (or resume) the scene, then write turntable, mesh, loss curve and metrics."""
    out = Path(cfg.paths.output_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {cfg.steps}, {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    # 1. Models, scene, loss
    sd, domain = load_models(cfg)
    nerf: VoxelNeRF = instantiate(cfg.scene.nerf).to(cfg.device)
    cameras: CameraSampler = instantiate(cfg.scene.cameras)
    sds: MultiGuidanceSDS = instantiate(cfg.sds)(
        sd=sd, prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, domain_model=domain
    )
    optimizer = instantiate(cfg.scene.optimizer)(
        params=[p for p in nerf.parameters() if p.requires_grad]
    )

    # 2. Resume, or initialise
    identity = run_identity(cfg)
    history: dict[str, list[float]] = {"sds": [], "total": []}
    start, seconds, init_info = 0, 0.0, {}
    if ckpt_path.is_file() and cfg.resume:
        state = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
        if state["identity"] != identity:
            raise ValueError(
                f"{ckpt_path} was made with another prompt/model/scene/sds/init config; use another "
                "hydra.run.dir, delete the checkpoint, or set resume=false to start over"
            )
        nerf.load_state_dict(state["nerf"])
        optimizer.load_state_dict(state["optimizer"])
        sds.load_state_dict(state["sds"])
        generator.set_state(state["generator"])
        start, history, seconds = state["step"], state["history"], state["seconds"]
        init_info = state.get("init", {})
        log.info("idgen-3d: resumed %s at step %d", ckpt_path, start)
    else:
        init_info = initialise(nerf, cfg.init)

    def save(step: int) -> None:
        atomic_torch_save(
            {
                "identity": identity,
                "step": step,
                "nerf": nerf.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sds": sds.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "seconds": seconds,
                "init": init_info,
            },
            ckpt_path,
        )

    # 3. Optimise: random views -> renders -> SDS (+ smoothness and sparsity) -> Adam
    res = cfg.scene.render_resolution
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not cfg.progress_bar,
        desc="idgen-3d",
        dynamic_ncols=True,
    )
    for step in bar:
        views = cameras.sample(cfg.batch_size, generator)
        render = nerf.render(views, res, perturb=True, generator=generator)
        out_sds = sds(render.rgb, step=step, total_steps=cfg.steps, generator=generator)
        loss = (
            out_sds.loss
            + cfg.scene.tv_weight * nerf.total_variation()
            + cfg.scene.sparsity_weight * render.opacity.mean()
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {step}: non-finite loss {loss.item()}; lower scene.optimizer.lr or set "
                "sds.grad_clip (the last good checkpoint is kept)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["sds"].append(out_sds.loss.item())
        history["total"].append(loss.item())
        bar.set_postfix(loss=f"{history['total'][-1]:.4g}", refresh=False)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            seconds_now = seconds + time.perf_counter() - t0
            seconds, t0 = seconds_now, time.perf_counter()
            save(step + 1)
    bar.close()
    seconds += time.perf_counter() - t0
    if cfg.steps > start:
        save(cfg.steps)

    # 4. Outputs: evaluation views + metrics, turntable, mesh, loss curve
    nerf.eval()
    metrics, eval_rgb = evaluate_views(nerf, cameras, cfg)
    save_image_atomic(_grid_image(eval_rgb), out / "views.png")
    with torch.no_grad():
        turn = nerf.render(cameras.turntable(cfg.turntable.num_views), cfg.turntable.resolution).rgb
    write_gif(to_frames(turn, cfg.turntable.scale), out / "turntable.gif", fps=cfg.turntable.fps)
    mesh_info: dict[str, Any]
    try:
        mesh = extract_mesh(nerf, threshold=cfg.mesh.threshold, resolution=cfg.mesh.resolution)
        for fmt in cfg.mesh.formats:
            export_mesh(mesh, out / f"mesh.{fmt}")
        mesh_info = {**mesh_report(mesh), "files": [f"mesh.{f}" for f in cfg.mesh.formats]}
    except ValueError as err:  # an empty field: report it, the other outputs are still useful
        log.warning("idgen-3d: no mesh exported: %s", err)
        mesh_info = {"error": str(err)}
    if history["total"]:
        write_loss_curve(history, out / "loss.png")
    last = history["sds"][-max(1, len(history["sds"]) // 10) :] if history["sds"] else []
    summary = {
        "prompt": cfg.prompt,
        "steps": int(cfg.steps),
        "resumed_from": int(start),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(cfg.steps - start, 1), 4)
        if cfg.steps > start
        else None,
        "final_sds_loss": float(np.mean(last)) if last else None,
        "guidance_weights": {
            t.name: (sds.held.get(t.name) if t.weight == "auto" else float(t.weight))
            for t in sds.terms
        },
        "background": nerf.background_rgb().tolist(),
        "init": init_info,
        "mesh": mesh_info,
        **metrics,
        "files": ["turntable.gif", "views.png", "loss.png", "metrics.json", "checkpoints/last.pt"],
    }
    if not all(math.isfinite(v) for v in summary["background"]):
        raise FloatingPointError("the background colour is not finite; nothing written")
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    atomic_write_text(out / "3d_config.yaml", OmegaConf.to_yaml(plain, resolve=True))
    log.info("idgen-3d: %s", json.dumps({k: summary[k] for k in ("steps", "seconds")}))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="3d.yaml")
@task_wrapper
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    """``idgen-3d``: any ``group=null`` is accepted as "no group"."""
    return text_to_3d(cfg)


main = console_main(hydra_main, CONFIG_DIR)


if __name__ == "__main__":
    main()
