"""The 3D side of idgen-3d: cameras, nerfacc volume rendering against closed forms, meshes."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import trimesh

from idgen.scene import (
    Cameras,
    CameraSampler,
    VoxelNeRF,
    camera_rays,
    export_mesh,
    extract_mesh,
    init_from_mesh,
    lift_image,
    mesh_report,
    orbit_c2w,
    ray_box,
)
from idgen.scene.report import write_gif, write_loss_curve


def front_camera(radius: float = 3.0, fov: float = 40.0) -> Cameras:
    one = torch.ones(1)
    c2w = orbit_c2w(one * 0, one * 0, one * radius)
    return Cameras(c2w, one * fov, one * 0, one * 0, one * radius)


def sphere_field(nerf: VoxelNeRF, radius: float, density: float, rgb=(0.9, 0.1, 0.1)) -> None:
    inside = nerf.lattice().norm(dim=-1) <= radius
    r = nerf.resolution
    nerf.set_field(torch.where(inside, density, 1e-4), torch.tensor(rgb).expand(r, r, r, 3).clone())


def test_orbit_cameras_look_at_the_origin():
    c2w = orbit_c2w(torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(c2w[0, :3, 3], torch.tensor([0.0, 0.0, 3.0]))
    torch.testing.assert_close(c2w[1, :3, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # Columns are orthonormal, y stays up at elevation 0.
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(
        rot.transpose(1, 2) @ rot, torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(rot[:, :, 1], torch.tensor([[0.0, 1.0, 0.0]] * 2), atol=1e-6, rtol=0)
    origins, dirs = camera_rays(c2w, torch.tensor([40.0, 40.0]), 8, 8)
    # The four central pixels' rays point (almost) at the origin.
    centre = dirs[:, 3:5, 3:5].mean(dim=(1, 2))
    towards = -origins[:, 0, 0] / origins[:, 0, 0].norm(dim=-1, keepdim=True)
    assert torch.all((centre / centre.norm(dim=-1, keepdim=True) * towards).sum(-1) > 0.999)
    # Row 0 is the top of the image: its rays point up.
    assert torch.all(dirs[0, 0, :, 1] > 0) and torch.all(dirs[0, -1, :, 1] < 0)


def test_ray_box_slabs():
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    dirs = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far = ray_box(origins, dirs, 1.0)
    torch.testing.assert_close(near[0], torch.tensor(2.0))
    torch.testing.assert_close(far[0], torch.tensor(4.0))
    assert near[1] == far[1]  # misses the box: empty interval


def test_render_matches_beer_lambert_through_nerfacc():
    # A constant density sigma fills the box: the central ray crosses 2 units, so its opacity is
    # 1 - exp(-2 sigma) and its colour c * opacity + background * (1 - opacity).
    nerf = VoxelNeRF(resolution=8, num_samples=32, background=(0.2, 0.3, 0.4))
    sigma = 0.7
    nerf.set_field(torch.full((8, 8, 8), sigma), torch.tensor([0.9, 0.5, 0.1]).expand(8, 8, 8, 3))
    render = nerf.render(front_camera(fov=1.0), 2)  # narrow view: every ray ~ the axis
    opacity = 1 - math.exp(-2 * sigma)
    torch.testing.assert_close(
        render.opacity, torch.full_like(render.opacity, opacity), atol=2e-3, rtol=0
    )
    expected = torch.tensor([0.9, 0.5, 0.1]) * opacity + torch.tensor([0.2, 0.3, 0.4]) * (
        1 - opacity
    )
    torch.testing.assert_close(render.rgb[0, :, 0, 0], expected, atol=2e-3, rtol=0)
    # Accumulated depth sum(w t) = integral of (2 + s) sigma exp(-sigma s) over the 2-unit slab.
    depth = 2 * opacity + (1 - math.exp(-2 * sigma) * (1 + 2 * sigma)) / sigma
    torch.testing.assert_close(render.depth[0, 0, 0, 0], torch.tensor(depth), atol=5e-3, rtol=0)
    # Only nerfacc's batched (pure PyTorch) path ran: its CUDA extension was never loaded.
    assert "nerfacc.cuda._backend" not in sys.modules


def test_render_is_differentiable_in_the_grid_and_background():
    nerf = VoxelNeRF(resolution=8, num_samples=16)
    cams = CameraSampler().sample(2, torch.Generator().manual_seed(0))
    render = nerf.render(cams, 8, perturb=True, generator=torch.Generator().manual_seed(1))
    assert render.rgb.shape == (2, 3, 8, 8) and render.opacity.shape == (2, 1, 8, 8)
    (render.rgb.mean() + nerf.total_variation()).backward()
    assert nerf.grid.grad.abs().sum() > 0 and nerf.background.grad.abs().sum() > 0


def test_sphere_mesh_is_watertight_with_the_right_volume_in_every_format(tmp_path):
    nerf = VoxelNeRF(resolution=32)
    sphere_field(nerf, 0.5, 20.0)
    mesh = extract_mesh(nerf, threshold=10.0)
    report = mesh_report(mesh)
    assert report["watertight"]
    assert report["volume"] == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.1)
    for fmt in ("obj", "ply", "glb"):
        loaded = trimesh.load(export_mesh(mesh, tmp_path / f"m.{fmt}"), force="mesh")
        assert len(loaded.faces) == len(mesh.faces) and loaded.is_watertight, fmt
        # Vertex colours come from the field (red).
        assert loaded.visual.vertex_colors[:, 0].mean() > 200
    with pytest.raises(ValueError, match="suffix"):
        export_mesh(mesh, tmp_path / "m.stl")
    with pytest.raises(ValueError, match="no surface"):
        extract_mesh(VoxelNeRF(resolution=8, blob_density=0.0), threshold=5.0)


def test_init_from_mesh_fills_the_scaled_mesh(tmp_path):
    path = tmp_path / "ball.ply"
    export_mesh(trimesh.creation.icosphere(subdivisions=3, radius=7.0), path)
    nerf = VoxelNeRF(resolution=32)
    init_from_mesh(nerf, path)
    mesh = extract_mesh(nerf, threshold=5.0)
    # Scaled into 80% of the box: radius 0.8.
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.8**3, rel=0.15)
    assert float(nerf.blob_density) == 0.0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_from_mesh(nerf, tmp_path / "missing.obj")


def test_lift_image_keeps_colour_and_background():
    from idgen.toyworld import render_world, score

    images, specs = render_world("domain", 1, 32, seed=3, shape="circle", colour="green")
    nerf = VoxelNeRF(resolution=32)
    info = lift_image(nerf, np.asarray(images[0]))
    assert 0.03 < info["foreground_fraction"] < 0.5
    views = CameraSampler(radius=(2.5, 2.5), fov=(40, 40)).turntable(4, elevation=0.0)
    with torch.no_grad():
        rgb = nerf.render(views, 32).rgb
    # Front and back see the silhouette; side views see the inflated depth.
    metrics = score(rgb[[0, 2]], colours=["green", "green"])
    assert metrics["dark_fraction"] == 1.0 and metrics["colour_accuracy"] == 1.0
    with pytest.raises(ValueError, match="no foreground"):
        lift_image(nerf, np.full((8, 8, 3), 0.5))


def test_camera_sampler_ranges_and_errors():
    sampler = CameraSampler(azimuth=(10, 20), elevation=(0, 5), radius=(2, 3), fov=(30, 31))
    cams = sampler.sample(64, torch.Generator().manual_seed(0))
    assert len(cams) == 64
    assert cams.azimuth.min() >= 10 and cams.azimuth.max() <= 20
    torch.testing.assert_close(cams.c2w[:, :3, 3].norm(dim=-1), cams.radius)
    turn = sampler.turntable(4)
    torch.testing.assert_close(turn.azimuth, torch.tensor([0.0, 90.0, 180.0, 270.0]))
    with pytest.raises(ValueError, match="azimuth"):
        CameraSampler(azimuth=(20, 10))
    with pytest.raises(ValueError, match="elevation"):
        CameraSampler(elevation=(-100, 10))


def test_gif_and_loss_curve(tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    frames = np.stack([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(4)])
    gif = write_gif(frames, tmp_path / "t.gif")
    assert iio.imread(gif, index=None).shape[0] == 4
    png = write_loss_curve({"sds": [3.0, 2.0, float("nan"), 1.0]}, tmp_path / "loss.png")
    assert Image.open(png).size == (560, 320)
    with pytest.raises(ValueError, match="frames"):
        write_gif(frames[0], tmp_path / "bad.gif")
