"""Meshes from a radiance field (marching cubes) and fields from meshes and images (initialisation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy import ndimage
from skimage import measure

from idgen.scene.nerf import VoxelNeRF
from idgen.utils.io import atomic_write_bytes

MESH_FORMATS = (".obj", ".ply", ".glb")


@torch.no_grad()
def extract_mesh(
    nerf: VoxelNeRF, threshold: float = 5.0, resolution: int | None = None
) -> trimesh.Trimesh:
    """The ``density = threshold`` surface of ``nerf`` with vertex colours from the field.

    The density volume is padded with one empty cell on every side before marching cubes, so
    the surface is closed where the object touches the box; the mesh is then watertight unless
    the level set itself is degenerate (``mesh_report`` says which).
    """
    n = resolution or nerf.resolution
    points = nerf.lattice(n)
    density = nerf.query(points)[0].float().cpu().numpy()
    if not np.isfinite(density).all():
        raise ValueError("the field's density is not finite; the run diverged, nothing exported")
    if density.max() <= threshold:
        raise ValueError(
            f"no surface: the largest density is {density.max():.3g} <= mesh threshold "
            f"{threshold}; lower mesh.threshold or train longer"
        )
    step = 2 * nerf.bound / (n - 1)
    volume = np.pad(density, 1, mode="constant", constant_values=0.0)
    verts, faces, _, _ = measure.marching_cubes(volume, level=threshold, spacing=(step,) * 3)
    verts = verts - step - nerf.bound  # padded index p -> world -bound + (p - 1) * step
    # skimage orients faces for values decreasing outward the other way round: flip them so
    # normals point out of the dense region (positive volume).
    faces = np.ascontiguousarray(faces[:, ::-1])
    rgb = nerf.query(torch.as_tensor(verts, dtype=torch.float32, device=nerf.grid.device))[1]
    colours = np.concatenate(
        [
            (rgb.cpu().numpy() * 255).round().astype(np.uint8),
            np.full((len(verts), 1), 255, np.uint8),
        ],
        axis=1,
    )
    return trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colours, process=False)


def mesh_report(mesh: trimesh.Trimesh) -> dict:
    """Vertices, faces, watertightness and (when watertight) the enclosed volume."""
    return {
        "vertices": int(len(mesh.vertices)),
        "faces": int(len(mesh.faces)),
        "watertight": bool(mesh.is_watertight),
        "volume": float(mesh.volume) if mesh.is_watertight else None,
        "bounds": mesh.bounds.tolist(),
    }


def export_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write ``mesh`` as OBJ, PLY or GLB (by suffix), atomically."""
    path = Path(path)
    if path.suffix.lower() not in MESH_FORMATS:
        raise ValueError(f"mesh file {path}: suffix must be one of {MESH_FORMATS}")
    data = mesh.export(file_type=path.suffix.lower()[1:])
    return atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


@torch.no_grad()
def init_from_mesh(nerf: VoxelNeRF, mesh_path: str | Path, density: float = 20.0) -> None:
    """Start ``nerf`` from a mesh: scaled into 80% of the box, inside filled with ``density``,
    colour from the nearest vertex colour (grey if none)."""
    path = Path(mesh_path)
    if not path.is_file():
        raise FileNotFoundError(f"init mesh {path} does not exist")
    mesh = trimesh.load(path, force="mesh")
    if len(mesh.faces) == 0:
        raise ValueError(f"init mesh {path} has no faces")
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(0.8 * nerf.bound / np.abs(mesh.bounds).max())
    n = nerf.resolution
    pitch = 2 * nerf.bound / (n - 1)
    # Surface voxels by subdivision, then the inside by hole filling (no ray library needed).
    filled = mesh.voxelized(pitch).fill()
    points = nerf.lattice().reshape(-1, 3).cpu().numpy()
    inside = filled.is_filled(points).reshape(n, n, n)
    target = np.where(inside, density, 1e-3)
    colours = np.full((n, n, n, 3), 0.5, dtype=np.float32)
    vc = getattr(mesh.visual, "vertex_colors", None)
    if vc is not None and len(vc) == len(mesh.vertices):
        _, nearest = _nearest(mesh.vertices, points)
        colours = (vc[nearest, :3] / 255.0).reshape(n, n, n, 3).astype(np.float32)
    nerf.set_field(torch.from_numpy(target.astype(np.float32)), torch.from_numpy(colours))


def _nearest(vertices: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    distance, index = cKDTree(vertices).query(points)
    return distance, index


@torch.no_grad()
def lift_image(
    nerf: VoxelNeRF,
    image: np.ndarray,
    density: float = 20.0,
    thickness: float = 0.5,
    foreground_distance: float = 0.25,
) -> dict:
    """Start ``nerf`` from one front-view image (the paper's image-to-3D step, simplified).

    Without a novel-view model offline, the object is lifted by inflation: the foreground (pixels
    farther than ``foreground_distance`` from the border colour, RGB in [0, 1]) is seen from the
    azimuth-0 camera orthographically over the box; each foreground pixel becomes a column along
    z whose half-depth grows with the distance to the silhouette's edge (a balloon of relative
    ``thickness``), coloured by that pixel. The border colour becomes the background.
    Returns what was lifted (foreground fraction, background colour).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"init image must be HxWx3, got shape {image.shape}")
    if image.max() > 1.0:
        image = image / 255.0
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(image - background, axis=-1) > foreground_distance
    if not mask.any():
        raise ValueError(
            "init image has no foreground (every pixel is near the border colour); pass an image "
            "with an object or lower foreground_distance"
        )
    # Balloon depth: sqrt of the normalised distance to the silhouette's edge.
    edge = ndimage.distance_transform_edt(mask)
    half_depth = thickness * nerf.bound * np.sqrt(edge / edge.max())
    h, w = mask.shape
    points = nerf.lattice().cpu().numpy()  # [x, y, z] world points
    # Orthographic view from +z: column u <- x, row v <- -y.
    u = np.clip(((points[..., 0] / nerf.bound + 1) / 2 * w).astype(int), 0, w - 1)
    v = np.clip(((1 - points[..., 1] / nerf.bound) / 2 * h).astype(int), 0, h - 1)
    inside = mask[v, u] & (np.abs(points[..., 2]) <= half_depth[v, u])
    target = np.where(inside, density, 1e-3).astype(np.float32)
    colours = image[v, u].astype(np.float32)
    nerf.set_field(torch.from_numpy(target), torch.from_numpy(colours))
    nerf.background.data.copy_(torch.logit(torch.tensor(background).clamp(1e-3, 1 - 1e-3)))
    return {"foreground_fraction": float(mask.mean()), "background": background.tolist()}
