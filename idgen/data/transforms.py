"""Image -> training tensor: resize the short side, crop, optional flip, scale to [-1, 1]."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2 as T


def build_image_transform(resolution: int, center_crop: bool = True, random_flip: bool = False):
    """The transform diffusers' training scripts use, on a PIL RGB image."""
    steps = [
        T.PILToTensor(),
        T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(resolution) if center_crop else T.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize([0.5], [0.5])]
    return T.Compose(steps)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3,H,W] in [-1, 1] -> PIL RGB."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
