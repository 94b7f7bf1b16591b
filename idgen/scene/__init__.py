"""3D for score distillation: orbit cameras, a voxel NeRF rendered with nerfacc, meshes."""

from idgen.scene.cameras import Cameras, CameraSampler, camera_rays, orbit_c2w
from idgen.scene.mesh import (
    MESH_FORMATS,
    export_mesh,
    extract_mesh,
    init_from_mesh,
    lift_image,
    mesh_report,
)
from idgen.scene.nerf import Render, VoxelNeRF, ray_box

__all__ = [
    "MESH_FORMATS",
    "CameraSampler",
    "Cameras",
    "Render",
    "VoxelNeRF",
    "camera_rays",
    "export_mesh",
    "extract_mesh",
    "init_from_mesh",
    "lift_image",
    "mesh_report",
    "orbit_c2w",
    "ray_box",
]
