"""Unlabeled domain image folders as a LightningDataModule."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from idgen.data.images import DEFAULT_EXTENSIONS, check_images, list_image_files, load_rgb
from idgen.data.latents import CachedLatentDataset, cache_key, load_or_build_cache
from idgen.data.transforms import RecordedCrop, build_image_transform
from idgen.utils.io import atomic_write_text
from idgen.utils.threads import plan_threads
from idgen.utils.validation import PathError


class SkippedImagesWarning(UserWarning):
    """Some files in a domain folder were not usable and were skipped."""


class DomainImageDataset(Dataset):
    """Images of one domain, returned as ``{"pixel_values": [3,H,W] in [-1,1], "index": i}``
    plus each image's size micro-conditioning (SDXL's ``time_ids``; SD1.5 ignores it):
    ``original_size`` (h, w before resizing), ``crop_top_left`` (where the crop cut, in resized
    pixels) and ``target_size`` (h, w of ``pixel_values``)."""

    def __init__(self, files: Sequence[Path], transform) -> None:
        self.files = list(files)
        self.transform = transform
        steps = getattr(transform, "transforms", [transform])
        self.crop = next((t for t in steps if isinstance(t, RecordedCrop)), None)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.files[index])
        pixels = self.transform(image)
        item = {"pixel_values": pixels, "index": index}
        if self.crop is not None:  # read right after the call that set it (one per worker)
            item |= {
                "original_size": torch.tensor([image.height, image.width]),
                "crop_top_left": torch.tensor(self.crop.last),
                "target_size": torch.tensor(list(pixels.shape[-2:])),
            }
        return item


class EpochSeededSampler(DistributedSampler):
    """A random permutation per epoch drawn from ``seed + epoch``; each process takes its share.

    Lightning calls ``set_epoch`` before every epoch, also after resuming from a checkpoint, so
    a resumed run continues with the order an uninterrupted run would have used (a plain
    ``shuffle=True`` loader with a fixed generator would replay epoch 0's order instead).
    Under DDP (one or several machines) rank ``r`` of ``world`` takes positions ``r, r + world,
    ...`` of that one permutation (padded as ``DistributedSampler`` pads), so batch ``b`` of all
    ranks together holds the images of a one-process run's batch ``b`` at ``world`` times the
    batch size, whatever the number of processes. Being a ``DistributedSampler``, Lightning
    uses it as it is instead of wrapping it in one that would shuffle a second time.
    """

    def __init__(
        self,
        data_source: Dataset,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:  # the running process group, if any
            dist = torch.distributed
            running = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas or (dist.get_world_size() if running else 1)
            rank = rank if rank is not None else (dist.get_rank() if running else 0)
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        """Start epoch ``epoch``'s share at position ``skip`` (once: a mid-epoch resume)."""
        self._resume = (epoch, skip)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / max(len(order), 1)))[:padding]
        order = order[self.rank : self.total_size : self.num_replicas]
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
        self._resume = None
        return iter(order)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position inside an epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` of a loader that has one in every checkpoint and hands it
    back through ``load_state_dict`` on resume; the epoch's :class:`EpochSeededSampler` then
    skips the batches already trained on, so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run would have. ``progress`` returns the batches trained in the current epoch
    (the trainer's count: gradient accumulation and a prefetching fetcher would skew our own).
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        batches = self.progress() if self.progress is not None else 0
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not hasattr(self.sampler, "resume"):
            warnings.warn(
                f"{type(self.sampler).__name__} cannot resume mid-epoch; the epoch restarts.",
                stacklevel=2,
            )
            return
        skip = int(state_dict.get("batches", 0)) * int(self.batch_size or 1)
        self.sampler.resume(int(state_dict.get("epoch", 0)), skip)


class DomainImageDataModule(L.LightningDataModule):
    """A recursive folder of unlabeled images of one domain.

    Unusable files (corrupt, truncated, empty, not images, unreadable, or below ``min_size`` with
    ``small_images="skip"``) are skipped with one warning that counts them and names the first
    few. The file order is deterministic; the files used are written to ``manifest_path``.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int | None = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        max_images: int | None = None,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        min_size: int = 0,
        small_images: str = "upscale",
        val_fraction: float = 0.0,
        seed: int = 0,
        manifest_path: str | None = None,
        scan_cache_dir: str | None = None,
        drop_last: bool = True,
        persistent_workers: bool = False,
        cache_latents: bool = False,
        latent_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if small_images not in ("upscale", "skip"):
            raise ValueError(f"data.small_images must be 'upscale' or 'skip', got {small_images!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.root = os.path.expanduser(str(root))
        self.resolution = resolution
        self.batch_size = batch_size
        if num_workers is None:  # data.num_workers=null: as idgen.utils.threads computes it
            num_workers = plan_threads().workers
        self.num_workers = num_workers
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.max_images = max_images
        self.extensions = tuple(extensions)
        self.min_size = min_size
        self.small_images = small_images
        self.val_fraction = val_fraction
        self.seed = seed
        self.manifest_path = manifest_path
        self.scan_cache_dir = scan_cache_dir
        self.drop_last = drop_last
        self.persistent_workers = persistent_workers and num_workers > 0
        if cache_latents and not center_crop:
            raise ValueError(
                "data.cache_latents=true needs data.center_crop=true (random crops differ every "
                "epoch, so their latents cannot be cached)"
            )
        if cache_latents and not latent_cache_dir:
            raise ValueError("data.cache_latents=true needs data.latent_cache_dir")
        self.cache_latents = cache_latents
        self.latent_cache_dir = latent_cache_dir
        self._latent_dataset: Dataset | None = None
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []

    # --- scanning ---------------------------------------------------------------------------
    def _scan_key(self, candidates: list[Path]) -> str:
        h = hashlib.sha256()
        h.update(f"{self.min_size}|{self.small_images}".encode())
        for path in candidates:
            st = path.stat()
            h.update(
                f"{path.relative_to(self.root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode()
            )
        return h.hexdigest()[:24]

    def scan(self) -> list[Path]:
        """All usable files under ``root`` in sorted order (cached when ``scan_cache_dir`` is set)."""
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"Domain image folder '{self.root}' does not exist: set data.root to a folder of images."
            )
        candidates = list_image_files(self.root, self.extensions)
        if not candidates:
            raise FileNotFoundError(
                f"Domain image folder '{self.root}' holds no files with extensions "
                f"{', '.join(self.extensions)}: put images there or change data.extensions."
            )
        cache_file = None
        if self.scan_cache_dir:
            cache_file = Path(self.scan_cache_dir) / f"scan-{self._scan_key(candidates)}.json"
            if cache_file.is_file():
                cached = json.loads(cache_file.read_text())
                self.skipped = [(Path(self.root) / p, why) for p, why in cached["skipped"]]
                self._warn_skipped()
                return [Path(self.root) / p for p in cached["good"]]
        good, self.skipped = check_images(
            candidates, min_size=self.min_size, skip_small=self.small_images == "skip"
        )
        self._warn_skipped()
        if not good:
            reasons = "; ".join(why for _, why in self.skipped[:3])
            # a user's folder, not a bug: one line and exit 2 (a PathError), not a traceback
            raise PathError(
                "data.root",
                str(self.root),
                f"has {len(candidates)} candidate files but none is usable ({reasons})",
                "Check the files or data.min_size / data.small_images.",
            )
        if cache_file is not None:
            rel = lambda p: p.relative_to(self.root).as_posix()  # noqa: E731
            atomic_write_text(
                cache_file,
                json.dumps(
                    {
                        "good": [rel(p) for p in good],
                        "skipped": [(rel(p), w) for p, w in self.skipped],
                    }
                ),
            )
        return good

    def _warn_skipped(self) -> None:
        if not self.skipped:
            return
        first = ", ".join(p.name for p, _ in self.skipped[:5])
        more = "" if len(self.skipped) <= 5 else f" and {len(self.skipped) - 5} more"
        warnings.warn(
            f"Skipped {len(self.skipped)} unusable file(s) in '{self.root}': {first}{more} "
            f"(first reason: {self.skipped[0][1]})",
            SkippedImagesWarning,
            stacklevel=3,
        )

    # --- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_files:
            return
        files = self.scan()
        generator = torch.Generator().manual_seed(self.seed)
        if self.max_images is not None and len(files) > self.max_images:
            # A seeded random subset (kept in folder order) rather than the first N files,
            # which are often one class or one source in real folders.
            keep = torch.randperm(len(files), generator=generator)[: self.max_images]
            files = [files[i] for i in sorted(keep.tolist())]
        n_val = int(round(len(files) * self.val_fraction))
        if n_val:
            val_idx = set(torch.randperm(len(files), generator=generator)[:n_val].tolist())
            self.val_files = [f for i, f in enumerate(files) if i in val_idx]
            files = [f for i, f in enumerate(files) if i not in val_idx]
        self.train_files = files
        if self.manifest_path:
            self.write_manifest(self.manifest_path)

    def write_manifest(self, path: str | os.PathLike) -> None:
        """Write the files used (train, then val) relative to ``root``, one per line."""
        lines = [
            f"# root: {self.root}",
            f"# train: {len(self.train_files)} val: {len(self.val_files)}",
        ]
        lines += [f"train\t{p.relative_to(self.root).as_posix()}" for p in self.train_files]
        lines += [f"val\t{p.relative_to(self.root).as_posix()}" for p in self.val_files]
        atomic_write_text(path, "\n".join(lines) + "\n")

    @property
    def train_dataset(self) -> DomainImageDataset:
        transform = build_image_transform(self.resolution, self.center_crop, self.random_flip)
        return DomainImageDataset(self.train_files, transform)

    @property
    def val_dataset(self) -> DomainImageDataset:
        return DomainImageDataset(
            self.val_files, build_image_transform(self.resolution, True, False)
        )

    def attach_vae(self, vae, model_id: str) -> None:
        """Called by training modules in ``setup``: with ``cache_latents``, encode once and reuse.

        Training batches then hold ``latent_params`` instead of ``pixel_values``; use
        ``idgen.data.latents.latents_from_batch`` to get latents from either.
        """
        if not self.cache_latents:
            return
        if not self.train_files:
            self.setup("fit")
        plain = DomainImageDataset(
            self.train_files, build_image_transform(self.resolution, True, False)
        )
        key = cache_key(self.train_files, self.resolution, model_id, vae)
        tensors = load_or_build_cache(
            self.latent_cache_dir,
            key,
            plain,
            vae,
            with_flips=self.random_flip,
            batch_size=self.batch_size,
        )
        self._latent_dataset = CachedLatentDataset(tensors, random_flip=self.random_flip)

    def _batches_done(self) -> int:
        """Batches trained in the current epoch (from the trainer), for :class:`ResumableDataLoader`."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        batch_size = min(self.batch_size, len(dataset)) if drop_last else self.batch_size
        kwargs = dict(
            batch_size=batch_size,
            num_workers=self.num_workers,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
        )
        if not shuffle:
            # Its own generator too: the validation loop's iterator must not draw from the
            # global RNG that training's random flips use (see below).
            return DataLoader(dataset, generator=torch.Generator().manual_seed(self.seed), **kwargs)
        sampler = EpochSeededSampler(dataset, self.seed)
        # Its own generator: creating an iterator draws a base seed, which from the global RNG
        # would shift the random flips of a resumed run (its iterator is made after the restore).
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(
            dataset, sampler=sampler, generator=generator, progress=self._batches_done, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_files:
            self.setup("fit")
        dataset = self._latent_dataset if self._latent_dataset is not None else self.train_dataset
        return self._loader(dataset, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False, drop_last=False)
