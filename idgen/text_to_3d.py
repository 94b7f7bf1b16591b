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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from idgen import cli
from idgen.preflight import validate_3d
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
from idgen.utils.images import make_grid
from idgen.utils.io import atomic_torch_save, atomic_write_text, save_image_atomic

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


@dataclass
class Run:
    """What the optimisation works on: the scene, its cameras, the loss, the optimiser and the
    run's own random generator (cameras, ray jitter and SDS noise draw from it, in that order)."""

    nerf: VoxelNeRF
    cameras: CameraSampler
    sds: MultiGuidanceSDS
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


@dataclass
class RunState:
    """Where the run stands, as the checkpoint keeps it (besides the modules' states)."""

    identity: str
    start: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"sds": [], "total": []})
    seconds: float = 0.0
    init_info: dict = field(default_factory=dict)


def build_run(cfg: DictConfig) -> Run:
    """Seed, then load the models and build the scene, cameras, SDS loss and optimiser."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sd, domain = load_models(cfg)
    nerf: VoxelNeRF = instantiate(cfg.scene.nerf).to(cfg.device)
    cameras: CameraSampler = instantiate(cfg.scene.cameras)
    sds: MultiGuidanceSDS = instantiate(cfg.sds)(
        sd=sd, prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, domain_model=domain
    )
    optimizer = instantiate(cfg.scene.optimizer)(
        params=[p for p in nerf.parameters() if p.requires_grad]
    )
    return Run(nerf, cameras, sds, optimizer, generator)


def resume_or_initialise(run: Run, cfg: DictConfig, ckpt_path: Path) -> RunState:
    """Load ``ckpt_path`` into ``run`` if it exists (and ``cfg.resume``), else initialise the
    scene from ``cfg.init``; a checkpoint of another run identity is refused."""
    identity = run_identity(cfg)
    if not (ckpt_path.is_file() and cfg.resume):
        return RunState(identity, init_info=initialise(run.nerf, cfg.init))
    state = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
    if state["identity"] != identity:
        raise ValueError(
            f"{ckpt_path} was made with another prompt/model/scene/sds/init config; use another "
            "hydra.run.dir, delete the checkpoint, or set resume=false to start over"
        )
    run.nerf.load_state_dict(state["nerf"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.sds.load_state_dict(state["sds"])
    run.generator.set_state(state["generator"])
    log.info("idgen-3d: resumed %s at step %d", ckpt_path, state["step"])
    return RunState(
        identity, state["step"], state["history"], state["seconds"], state.get("init", {})
    )


def save_checkpoint(run: Run, state: RunState, step: int, ckpt_path: Path) -> None:
    """Write the run at ``step`` (modules, generator, history, time) atomically to ``ckpt_path``."""
    atomic_torch_save(
        {
            "identity": state.identity,
            "step": step,
            "nerf": run.nerf.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "sds": run.sds.state_dict(),
            "generator": run.generator.get_state(),
            "history": state.history,
            "seconds": state.seconds,
            "init": state.init_info,
        },
        ckpt_path,
    )


def optimisation_step(run: Run, cfg: DictConfig, step: int) -> tuple[float, float]:
    """One step: random views -> renders -> SDS (+ smoothness and sparsity) -> Adam.

    Returns the SDS and the total loss."""
    views = run.cameras.sample(cfg.batch_size, run.generator)
    render = run.nerf.render(
        views, cfg.scene.render_resolution, perturb=True, generator=run.generator
    )
    out_sds = run.sds(render.rgb, step=step, total_steps=cfg.steps, generator=run.generator)
    loss = (
        out_sds.loss
        + cfg.scene.tv_weight * run.nerf.total_variation()
        + cfg.scene.sparsity_weight * render.opacity.mean()
    )
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"step {step}: non-finite loss {loss.item()}; lower scene.optimizer.lr or set "
            "sds.grad_clip (the last good checkpoint is kept)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return out_sds.loss.item(), loss.item()


def optimise(run: Run, state: RunState, cfg: DictConfig, ckpt_path: Path) -> None:
    """Steps ``state.start`` to ``cfg.steps`` with a progress bar, extending ``state.history``
    and ``state.seconds``; checkpoints every ``cfg.checkpoint_every`` steps and at the end."""
    t0 = time.perf_counter()
    bar = tqdm(
        range(state.start, cfg.steps),
        initial=state.start,
        total=cfg.steps,
        disable=not cfg.progress_bar,
        desc="idgen-3d",
        dynamic_ncols=True,
    )
    for step in bar:
        sds_loss, total_loss = optimisation_step(run, cfg, step)
        state.history["sds"].append(sds_loss)
        state.history["total"].append(total_loss)
        bar.set_postfix(loss=f"{total_loss:.4g}", refresh=False)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            seconds_now = state.seconds + time.perf_counter() - t0
            state.seconds, t0 = seconds_now, time.perf_counter()
            save_checkpoint(run, state, step + 1, ckpt_path)
    bar.close()
    state.seconds += time.perf_counter() - t0
    if cfg.steps > state.start:
        save_checkpoint(run, state, cfg.steps, ckpt_path)


def write_renders(run: Run, cfg: DictConfig, out: Path) -> dict[str, Any]:
    """``views.png`` (the evaluation views) and ``turntable.gif``; returns the view metrics."""
    metrics, eval_rgb = evaluate_views(run.nerf, run.cameras, cfg)
    views = [Image.fromarray(frame) for frame in to_frames(eval_rgb, 2)]
    save_image_atomic(make_grid(views, ncols=len(views), pad=0), out / "views.png")
    with torch.no_grad():
        turn = run.nerf.render(
            run.cameras.turntable(cfg.turntable.num_views), cfg.turntable.resolution
        ).rgb
    write_gif(to_frames(turn, cfg.turntable.scale), out / "turntable.gif", fps=cfg.turntable.fps)
    return metrics


def write_mesh(nerf: VoxelNeRF, mesh_cfg: DictConfig, out: Path) -> dict[str, Any]:
    """``mesh.<fmt>`` for each of ``mesh_cfg.formats``; returns the mesh report (or the error)."""
    try:
        mesh = extract_mesh(nerf, threshold=mesh_cfg.threshold, resolution=mesh_cfg.resolution)
        for fmt in mesh_cfg.formats:
            export_mesh(mesh, out / f"mesh.{fmt}")
        return {**mesh_report(mesh), "files": [f"mesh.{f}" for f in mesh_cfg.formats]}
    except ValueError as err:  # an empty field: report it, the other outputs are still useful
        log.warning("idgen-3d: no mesh exported: %s", err)
        return {"error": str(err)}


def summarise(
    run: Run, state: RunState, cfg: DictConfig, metrics: dict[str, Any], mesh_info: dict[str, Any]
) -> dict[str, Any]:
    """What ``metrics.json`` holds: run length and time, final loss, weights, init, mesh, views."""
    sds_history = state.history["sds"]
    last = sds_history[-max(1, len(sds_history) // 10) :] if sds_history else []
    return {
        "prompt": cfg.prompt,
        "steps": int(cfg.steps),
        "resumed_from": int(state.start),
        "seconds": round(state.seconds, 2),
        "seconds_per_step": round(state.seconds / max(cfg.steps - state.start, 1), 4)
        if cfg.steps > state.start
        else None,
        "final_sds_loss": float(np.mean(last)) if last else None,
        "guidance_weights": {
            t.name: (run.sds.held.get(t.name) if t.weight == "auto" else float(t.weight))
            for t in run.sds.terms
        },
        "background": run.nerf.background_rgb().tolist(),
        "init": state.init_info,
        "mesh": mesh_info,
        **metrics,
        "files": ["turntable.gif", "views.png", "loss.png", "metrics.json", "checkpoints/last.pt"],
    }


def write_outputs(run: Run, state: RunState, cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Evaluation views + metrics, turntable, mesh, loss curve, ``metrics.json`` and the config;
    returns the summary (as in ``metrics.json``)."""
    run.nerf.eval()
    metrics = write_renders(run, cfg, out)
    mesh_info = write_mesh(run.nerf, cfg.mesh, out)
    if state.history["total"]:
        write_loss_curve(state.history, out / "loss.png")
    summary = summarise(run, state, cfg, metrics, mesh_info)
    if not all(math.isfinite(v) for v in summary["background"]):
        raise FloatingPointError("the background colour is not finite; nothing written")
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    atomic_write_text(out / "3d_config.yaml", OmegaConf.to_yaml(plain, resolve=True))
    log.info("idgen-3d: %s", json.dumps({k: summary[k] for k in ("steps", "seconds")}))
    return summary


def text_to_3d(cfg: DictConfig) -> dict[str, Any]:
    """Optimise (or resume) the scene, then write turntable, mesh, loss curve and metrics."""
    validate_3d(cfg)  # numbers, weights, device, a domain model that fits the base: no model read
    out = Path(cfg.paths.output_dir)
    ckpt_path = out / "checkpoints" / "last.pt"

    # 1. Models, scene, loss
    run = build_run(cfg)
    # 2. Resume, or initialise
    state = resume_or_initialise(run, cfg, ckpt_path)
    # 3. Optimise: random views -> renders -> SDS (+ smoothness and sparsity) -> Adam
    optimise(run, state, cfg, ckpt_path)
    # 4. Outputs: evaluation views + metrics, turntable, mesh, loss curve
    return write_outputs(run, state, cfg, out)


# The console script (idgen.cli: nothing heavy is imported before the task and its checks run)
main = cli.text_to_3d


if __name__ == "__main__":
    main()
