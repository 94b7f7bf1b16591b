"""Feature extractors for FID/KID: torchmetrics' Inception-v3 or any small ``nn.Module``.

An extractor takes a [B, 3, H, W] uint8 batch and returns [B, D] features. It carries
``num_features``, ``input_size`` (the side it resizes to, for the record) and
``extractor_id`` (keys the reference-feature cache).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from idgen.metrics.images import load_batch

# torch-fidelity's Inception-v3 port (the weights of the TF FID reference implementation).
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_INPUT_SIZE = 299
#: the config key of a local Inception weights file (idgen/conf/metrics/inception.yaml)
WEIGHTS_KEY = "metrics.fid.extractor.weights_path"
_HOW_TO_GET_INCEPTION = (
    "On a machine with internet run `wget {url}` (about 92 MB) and pass the file with "
    f"{WEIGHTS_KEY}=<file>, or put it in the torch hub cache as "
    "$TORCH_HOME/hub/checkpoints/{name} (default ~/.cache/torch/hub/checkpoints/)."
)


class FeatureExtractorError(RuntimeError):
    """A feature extractor cannot be built (e.g. Inception weights unavailable offline)."""


def how_to_get_inception() -> str:
    """One sentence: where the Inception-v3 weights come from and how to pass them."""
    return _HOW_TO_GET_INCEPTION.format(url=INCEPTION_URL, name=Path(INCEPTION_URL).name)


def inception_weights_unavailable(weights_path: str | os.PathLike | None) -> str | None:
    """Why :class:`InceptionFeatures` could not get its weights here, or None when it can.

    A given ``weights_path`` must be a file; without one, the torch hub cache must hold the
    weights unless a download is allowed (not offline). Reads no weights: idgen-eval's preflight
    asks this before sampling or reading any image.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        return None if path.is_file() else f"the Inception weights file '{path}' does not exist"
    if _torch_hub_cached_inception().is_file() or not _offline():
        return None
    return (
        "FID/KID need the Inception-v3 weights, which are not on this machine "
        f"({_torch_hub_cached_inception()}) and cannot be downloaded offline "
        "(HF_HUB_OFFLINE/IDGEN_OFFLINE is set)"
    )


def _offline() -> bool:
    flags = (os.environ.get(k, "0").lower() for k in ("HF_HUB_OFFLINE", "IDGEN_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _torch_hub_cached_inception() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def module_digest(module: nn.Module) -> str:
    """A short hash of a module's class and state (weights and buffers)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def extractor_id(module: nn.Module) -> str:
    """``module.extractor_id`` if set, otherwise class name + a hash of its weights."""
    given = getattr(module, "extractor_id", None)
    return str(given) if given else f"{type(module).__name__}-{module_digest(module)}"


class InceptionFeatures(nn.Module):
    """torchmetrics' ``NoTrainInceptionV3`` (the standard FID network) as a uint8 -> [B, D] module."""

    input_size = INCEPTION_INPUT_SIZE

    def __init__(self, feature: int = 2048, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if feature not in (64, 192, 768, 2048):
            raise ValueError(f"metrics.fid.feature={feature}: must be one of 64, 192, 768, 2048.")
        how = how_to_get_inception()
        problem = inception_weights_unavailable(weights_path)
        if problem is not None:
            raise FeatureExtractorError(f"{WEIGHTS_KEY}={weights_path}: {problem}. {how}")
        if weights_path is not None:
            weights_path = Path(weights_path).expanduser()
            source = f"file-{_file_digest(weights_path)}"
        else:
            source = "torch-fidelity-release"
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(feature)],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            )
        except (
            OSError,
            RuntimeError,
        ) as err:  # URLError is an OSError; bad state dicts raise RuntimeError
            raise FeatureExtractorError(
                f"could not load the Inception-v3 weights: {err}. " + how
            ) from err
        self.num_features = feature
        self.extractor_id = f"inception-v3-compat-{feature}-{source}"
        self.description = (
            f"torchmetrics/torch-fidelity Inception-v3 ({feature}-d pool features), uint8 RGB input "
            f"resized to {INCEPTION_INPUT_SIZE}x{INCEPTION_INPUT_SIZE} (bilinear, antialiased) inside the network"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).reshape(images.shape[0], -1)


class TinyFeatureExtractor(nn.Module):
    """A fixed random conv net plus colour statistics, for CPU demos and tests.

    Its FID is NOT comparable to Inception FID: use it to compare runs with each other only.
    """

    def __init__(self, seed: int = 0, input_size: int = 64, width: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.input_size = input_size
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, width // 2, 3, stride=2, padding=1),
                nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
            ]
        )
        for conv in self.convs:  # deterministic weights whatever the global RNG state
            fan_in = conv.in_channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / fan_in**0.5
            conv.bias.data.zero_()
        self.requires_grad_(False)
        self.eval()
        # conv features (mean, std over space) + per-channel colour mean and std
        self.num_features = 2 * width + 6
        self.extractor_id = f"tiny-random-conv-v1-seed{seed}-size{input_size}-width{width}"
        self.description = (
            f"tiny random-conv extractor ({self.num_features}-d), uint8 RGB input resized to "
            f"{input_size}x{input_size}; NOT comparable to Inception FID"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        x = (x - 127.5) / 127.5
        colour = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), colour], dim=1)


def describe(module: nn.Module) -> str:
    return str(
        getattr(module, "description", f"custom extractor {extractor_id(module)}, uint8 RGB input")
    )


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    paths: Sequence[Path],
    resolution: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    desc: str = "features",
) -> torch.Tensor:
    """Features of the images at ``paths`` as a float32 [N, D] CPU tensor, in ``paths`` order.

    A tqdm bar (the style of Lightning's bars) counts images on a terminal; off in log files.
    """
    from tqdm.auto import tqdm

    extractor = extractor.to(device).eval()
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            # 1. read a batch as uint8 (resized and centre-cropped to `resolution` when given)
            batch = load_batch(paths[start : start + batch_size], resolution).to(device)
            # 2. extract; the extractor resizes to its own input size
            chunks.append(extractor(batch).float().reshape(batch.shape[0], -1).cpu())
            bar.update(batch.shape[0])
    return torch.cat(chunks) if chunks else torch.empty(0, getattr(extractor, "num_features", 0))
