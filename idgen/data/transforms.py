"""Image -> training tensor: resize the short side, crop, optional flip, scale to [-1, 1]."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2 as T


class RecordedCrop(T.RandomCrop):
    """A square crop (centred, or random as ``RandomCrop``) that remembers its top-left corner
    in ``last`` (``(top, left)``): SDXL's crop micro-conditioning of the image it just made."""

    def __init__(self, size: int, center: bool) -> None:
        super().__init__(size)
        self.center = center
        self.last = (0, 0)

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs) if not self.center else None
        if params is None:  # as CenterCrop: round((h - size) / 2) from the top and left
            h, w = T.functional.get_size(flat_inputs[0])
            top, left = int(round((h - self.size[0]) / 2.0)), int(round((w - self.size[1]) / 2.0))
            params = dict(
                needs_crop=True,
                top=top,
                left=left,
                height=self.size[0],
                width=self.size[1],
                needs_pad=False,
                padding=[0, 0, 0, 0],
            )
        self.last = (params["top"], params["left"])
        return params


def build_image_transform(resolution: int, center_crop: bool = True, random_flip: bool = False):
    """The transform diffusers' training scripts use, on a PIL RGB image. Its crop step
    (:class:`RecordedCrop`) records where it cut (the flip, after it, is not recorded)."""
    steps = [
        T.PILToTensor(),
        T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        RecordedCrop(resolution, center=center_crop),
    ]
    if random_flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize([0.5], [0.5])]
    return T.Compose(steps)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3,H,W] in [-1, 1] -> PIL RGB."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
