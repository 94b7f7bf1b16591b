"""Orbit cameras around the origin and their rays (y up; azimuth 0 looks from +z towards -z)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def orbit_c2w(azimuth: torch.Tensor, elevation: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices ``[B, 4, 4]`` of cameras on a sphere looking at the origin.

    Angles in degrees. Camera axes follow OpenGL: x right, y up, looking along -z.
    """
    az, el = torch.deg2rad(azimuth.float()), torch.deg2rad(elevation.float())
    eye = torch.stack(
        [el.cos() * az.sin(), el.sin(), el.cos() * az.cos()], dim=-1
    ) * radius.float().unsqueeze(-1)
    forward = -eye / eye.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 1.0, 0.0]).expand_as(forward)
    right = torch.linalg.cross(forward, up, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.eye(4).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, eye
    return c2w


def camera_rays(
    c2w: torch.Tensor, fov: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays through pixel centres: origins and unit directions, each ``[B, H, W, 3]``.

    ``fov`` is the vertical field of view in degrees, one per camera. Row 0 is the image top.
    """
    focal = 0.5 * height / torch.tan(torch.deg2rad(fov.float()) / 2)  # [B]
    j, i = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) + 0.5,
        torch.arange(width, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    f = focal.view(-1, 1, 1)
    dirs = torch.stack(
        [(i - width / 2) / f, -(j - height / 2) / f, -torch.ones_like(i).expand_as(f * i)], -1
    )  # camera space, [B, H, W, 3]
    world = torch.einsum("bhwk,bjk->bhwj", dirs, c2w[:, :3, :3].to(dirs))
    world = world / world.norm(dim=-1, keepdim=True)
    origins = c2w[:, :3, 3].to(dirs).view(-1, 1, 1, 3).expand_as(world)
    return origins, world


@dataclass
class Cameras:
    """A batch of cameras: poses ``[B, 4, 4]`` and what made them (degrees, scene units)."""

    c2w: torch.Tensor
    fov: torch.Tensor
    azimuth: torch.Tensor
    elevation: torch.Tensor
    radius: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]


def _check_range(name: str, pair: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in pair)
    if lo > hi:
        raise ValueError(f"CameraSampler.{name}: need low <= high, got [{lo}, {hi}]")
    return lo, hi


@dataclass
class CameraSampler:
    """Random orbit cameras (DreamFusion's view sampling): uniform azimuth/elevation/radius/fov.

    Ranges are ``(low, high)`` in degrees (angles) and scene units (radius; the object lives in
    ``[-bound, bound]^3``). ``elevation`` in ``[-90, 90]``.
    """

    azimuth: tuple[float, float] = (-180.0, 180.0)
    elevation: tuple[float, float] = (-10.0, 45.0)
    radius: tuple[float, float] = (3.0, 3.5)
    fov: tuple[float, float] = (40.0, 50.0)

    def __post_init__(self) -> None:
        for name in ("azimuth", "elevation", "radius", "fov"):
            setattr(self, name, _check_range(name, getattr(self, name)))
        if not (-90 <= self.elevation[0] and self.elevation[1] <= 90):
            raise ValueError(f"CameraSampler.elevation must lie in [-90, 90], got {self.elevation}")
        if self.radius[0] <= 0 or not (0 < self.fov[0] and self.fov[1] < 180):
            raise ValueError(
                f"CameraSampler: need radius > 0 and 0 < fov < 180, got radius={self.radius}, "
                f"fov={self.fov}"
            )

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Cameras:
        """``batch`` random cameras (drawn on the CPU)."""

        def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(batch, generator=generator)

        az, el, r, fov = (uniform(x) for x in (self.azimuth, self.elevation, self.radius, self.fov))
        return Cameras(orbit_c2w(az, el, r), fov, az, el, r)

    def turntable(self, num_views: int, elevation: float | None = None) -> Cameras:
        """``num_views`` cameras evenly around the object (azimuth 0 first) at the middle
        radius/fov and ``elevation`` (default: the middle of the range)."""
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        el = sum(self.elevation) / 2 if elevation is None else elevation
        az = torch.arange(num_views, dtype=torch.float32) * 360.0 / num_views  # front first
        full = torch.full((num_views,), 1.0)
        r, fov = full * sum(self.radius) / 2, full * sum(self.fov) / 2
        return Cameras(orbit_c2w(az, full * el, r), fov, az, full * el, r)
