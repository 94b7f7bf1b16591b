"""A voxel-grid NeRF rendered with nerfacc's batched (pure PyTorch) volume rendering.

Density and colour live on one dense ``[4, R, R, R]`` grid over ``[-bound, bound]^3`` and are read
by trilinear interpolation (``grid_sample``); each ray gets ``num_samples`` stratified samples
between its entry and exit of the box, and nerfacc turns densities into compositing weights
(``render_weight_from_density``) and sums colours, opacity and depth along rays
(``accumulate_along_rays``). Only nerfacc's batched ``[n_rays, n_samples]`` path is used: it is
plain PyTorch, so it runs on CPU and GPU without nerfacc's CUDA extension (never built here).

Why a dense grid and not an MLP or hash grid: it is the fastest field on a CPU at toy sizes,
needs no compiled extension (tiny-cuda-nn/hash encodings are CUDA-only), and marching cubes reads
it directly. DreamFusion's density "blob" at the centre starts the optimisation from an object
rather than empty space; the background is one learned colour (threestudio's solid-colour
background), so the diffusion prior may choose it, which is what the toy world's domain (dark
background) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import nerfacc
import torch
import torch.nn.functional as F
from torch import nn

from idgen.scene.cameras import Cameras, camera_rays


@dataclass
class Render:
    """Renders of a batch of cameras: ``rgb [B,3,H,W]`` in ``[0,1]`` (background composited),
    ``opacity [B,1,H,W]``, ``depth [B,1,H,W]`` (accumulated ``sum_i w_i t_i``: the expected
    distance times the opacity, 0 where empty)."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor


def ray_box(
    origins: torch.Tensor, dirs: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the box ``[-bound, bound]^3`` (slab method).

    Rays that miss get ``near == far`` (an empty interval, zero weight).
    """
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-bound - origins) * inv, (bound - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, torch.maximum(far, near)


class VoxelNeRF(nn.Module):
    """Dense voxel radiance field: ``softplus`` density + blob bias, ``sigmoid`` colour.

    Args:
        resolution: grid cells per side.
        bound: the scene box is ``[-bound, bound]^3``.
        num_samples: samples per ray.
        blob_density, blob_radius: density bias ``blob_density * (1 - |x| / blob_radius)``
            (threestudio's Magic3D blob): positive inside the radius, negative outside.
        background: initial background colour (RGB in ``(0, 1)``); ``learn_background`` lets
            the optimisation change it.
    """

    def __init__(
        self,
        resolution: int = 32,
        bound: float = 1.0,
        num_samples: int = 64,
        blob_density: float = 10.0,
        blob_radius: float = 0.5,
        background: tuple[float, float, float] = (0.5, 0.5, 0.5),
        learn_background: bool = True,
    ):
        super().__init__()
        if resolution < 2 or num_samples < 1 or bound <= 0 or blob_radius <= 0:
            raise ValueError(
                "VoxelNeRF: need resolution >= 2, num_samples >= 1, bound > 0, blob_radius > 0; "
                f"got {resolution}, {num_samples}, {bound}, {blob_radius}"
            )
        if not all(0.0 < c < 1.0 for c in background):
            raise ValueError(f"VoxelNeRF.background must lie in (0, 1), got {background}")
        self.resolution, self.bound, self.num_samples = resolution, float(bound), num_samples
        # Channels: raw density, then colour logits (sigmoid(0) = mid grey).
        self.grid = nn.Parameter(torch.zeros(1, 4, resolution, resolution, resolution))
        bg = torch.logit(torch.tensor(background, dtype=torch.float32))
        self.background = nn.Parameter(bg, requires_grad=learn_background)
        # Buffers: saved with checkpoints; an image or mesh lift switches the blob off.
        self.register_buffer("blob_density", torch.tensor(float(blob_density)))
        self.register_buffer("blob_radius", torch.tensor(float(blob_radius)))

    # ------------------------------------------------------------------------------ field

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density ``[...]`` and colour ``[..., 3]`` at world points ``[..., 3]``."""
        shape = points.shape[:-1]
        coords = (points / self.bound).reshape(1, -1, 1, 1, 3).to(self.grid.dtype)
        values = F.grid_sample(self.grid, coords, mode="bilinear", align_corners=True)
        values = values.reshape(4, -1).t()  # [N, 4]
        radius = points.reshape(-1, 3).norm(dim=-1)
        bias = self.blob_density * (1 - radius / self.blob_radius)
        sigma = F.softplus(values[:, 0] + bias)
        return sigma.reshape(shape), torch.sigmoid(values[:, 1:]).reshape(*shape, 3)

    def background_rgb(self) -> torch.Tensor:
        return torch.sigmoid(self.background)

    # ------------------------------------------------------------------------------ render

    def render(
        self,
        cameras: Cameras,
        height: int,
        width: int | None = None,
        perturb: bool = False,
        generator: torch.Generator | None = None,
    ) -> Render:
        """Differentiable renders of ``cameras`` at ``height x width`` pixels."""
        width = width or height
        device = self.grid.device
        origins, dirs = camera_rays(cameras.c2w.to(device), cameras.fov, height, width)
        b = origins.shape[0]
        origins, dirs = origins.reshape(-1, 3).to(device), dirs.reshape(-1, 3).to(device)
        near, far = ray_box(origins, dirs, self.bound)
        # 1. Intervals along each ray, [n_rays, n_samples]
        steps = torch.linspace(0, 1, self.num_samples + 1, device=device)
        edges = near[:, None] + (far - near)[:, None] * steps
        t_starts, t_ends = edges[:, :-1], edges[:, 1:]
        # 2. One sample per interval: its middle, or a random point in it while training
        u = torch.full_like(t_starts, 0.5)
        if perturb:
            u = torch.rand(t_starts.shape, generator=generator).to(device)
        t_mid = t_starts + (t_ends - t_starts) * u
        sigma, rgb = self.query(origins[:, None] + dirs[:, None] * t_mid[..., None])
        # 3. Compositing with nerfacc's batched path (pure PyTorch, no CUDA extension)
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigma)
        colour = nerfacc.accumulate_along_rays(weights, rgb)
        opacity = nerfacc.accumulate_along_rays(weights, None)
        depth = nerfacc.accumulate_along_rays(weights, t_mid[..., None])
        colour = colour + (1 - opacity) * self.background_rgb()

        def image(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, height, width, -1).permute(0, 3, 1, 2)

        return Render(image(colour), image(opacity), image(depth))

    # ------------------------------------------------------------------------------ regularisers

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference of neighbouring cells (smooth density and colour)."""
        g = self.grid
        return (
            (g[..., 1:, :, :] - g[..., :-1, :, :]).pow(2).mean()
            + (g[..., :, 1:, :] - g[..., :, :-1, :]).pow(2).mean()
            + (g[..., :, :, 1:] - g[..., :, :, :-1]).pow(2).mean()
        )

    def lattice(self, resolution: int | None = None) -> torch.Tensor:
        """World points of a regular ``[R, R, R, 3]`` lattice over the box, indexed ``[x, y, z]``."""
        n = resolution or self.resolution
        axis = torch.linspace(-self.bound, self.bound, n, device=self.grid.device)
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)

    @torch.no_grad()
    def set_field(self, density: torch.Tensor, colour: torch.Tensor, blob: bool = False) -> None:
        """Overwrite the grid from target density ``[R,R,R]`` and colour ``[R,R,R,3]`` in ``(0,1)``
        given on ``lattice()`` (``[x, y, z]``); ``blob=False`` switches the centre bias off."""
        r = self.resolution
        if density.shape != (r, r, r) or colour.shape != (r, r, r, 3):
            raise ValueError(
                f"set_field needs density [{r},{r},{r}] and colour [{r},{r},{r},3], got "
                f"{tuple(density.shape)} and {tuple(colour.shape)}"
            )
        if not blob:
            self.blob_density.zero_()
        # Inverse softplus of the target density (clamped: softplus^-1 needs > 0).
        d = density.float().clamp_min(1e-4)
        raw = d + torch.log(-torch.expm1(-d))
        logits = torch.logit(colour.float().clamp(1e-3, 1 - 1e-3))
        # grid_sample reads grid[..., z, y, x] at (x, y, z): move the lattice's [x, y, z] axes.
        field = torch.cat([raw[..., None], logits], dim=-1).permute(3, 2, 1, 0)
        if self.blob_density != 0:
            bias = self.blob_density * (1 - self.lattice().norm(dim=-1) / self.blob_radius)
            field[0] -= bias.permute(2, 1, 0)
        self.grid.copy_(field[None].to(self.grid))
