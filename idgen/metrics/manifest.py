"""Which images of a samples folder evaluation scores: the ones idgen-sample's manifest lists.

idgen-sample writes ``samples.jsonl`` (one record per finished image of its *current* plan,
atomically, at the start and at the end of every run) into its run dir, beside the image folder.
A folder sampled twice keeps the first run's extra files (24 images, then a rerun with
``images_per_prompt`` 18 leaves 6 of the old plan): they are never deleted, and evaluation
must not score them. With a manifest, exactly its images are scored and every other image file
of the folder is counted as ignored, with the reason; without one (a folder of images from
elsewhere), every image is scored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from idgen.metrics.images import ImageFolderError, list_images
from idgen.sampling.writer import MANIFEST

log = logging.getLogger(__name__)

SAMPLES_INDEX = MANIFEST  # idgen-sample's manifest: one JSON object per finished image


@dataclass(frozen=True)
class SampleManifest:
    """A ``samples.jsonl``: its path and its records (``file`` relative to its folder)."""

    path: Path
    records: tuple[dict, ...]

    def file_of(self, record: dict, samples_dir: Path) -> Path:
        """The image a record names: relative to the manifest's folder (idgen-sample's run
        dir), or by name inside ``samples_dir`` when the folder was moved on its own."""
        name = Path(record.get("file") or record.get("path") or record.get("image") or "")
        beside = self.path.parent / name
        return beside if beside.is_file() else samples_dir / name.name

    def prompts(self) -> dict[str, str]:
        """File name -> prompt, for the records that carry one."""
        out = {}
        for record in self.records:
            name = record.get("file") or record.get("path") or record.get("image")
            if name and "prompt" in record:
                out[Path(name).name] = str(record["prompt"])
        return out


def find_manifest(samples_dir: str | os.PathLike) -> SampleManifest | None:
    """The ``samples.jsonl`` in ``samples_dir`` or beside it (idgen-sample puts the images in
    ``<run>/samples`` and the manifest in ``<run>``), or None."""
    samples_dir = Path(samples_dir)
    for folder in (samples_dir, samples_dir.parent):
        path = folder / SAMPLES_INDEX
        if path.is_file():
            lines = path.read_text().splitlines()
            return SampleManifest(path, tuple(json.loads(x) for x in lines if x.strip()))
    return None


@dataclass(frozen=True)
class ScoredImages:
    """What evaluation scores (``paths``), what it leaves out (``ignored``) and why."""

    paths: list[Path]
    ignored: list[Path]
    manifest: Path | None

    def summary(self) -> dict:
        """For metrics.json: the manifest and how many files of the folder were not scored."""
        return {
            "manifest": None if self.manifest is None else str(self.manifest),
            "num_ignored_files": len(self.ignored),
        }


def images_to_score(samples_dir: str | os.PathLike) -> ScoredImages:
    """The images of ``samples_dir`` to evaluate: its manifest's, or all when it has none.

    A manifest whose files are all elsewhere (another ``images_subdir`` of the same run dir) is
    not this folder's and is not used. A listed file that is missing is an error (the folder was
    edited after sampling); files the manifest does not list are ignored, counted and logged.
    """
    samples_dir = Path(samples_dir).expanduser()
    found = list_images(samples_dir, "samples folder")
    manifest = find_manifest(samples_dir)
    if manifest is None:
        return ScoredImages(found, [], None)
    root = samples_dir.resolve()
    listed = [manifest.file_of(r, samples_dir) for r in manifest.records]
    listed = [p for p in listed if p.resolve().is_relative_to(root)]
    if manifest.records and not listed:
        return ScoredImages(found, [], None)  # the manifest of another image folder
    if not listed:
        raise ImageFolderError(
            f"samples folder '{samples_dir}': its manifest {manifest.path} lists no finished "
            "image (the sampling run finished none of its plan). Rerun idgen-sample with the "
            "same hydra.run.dir to finish it."
        )
    missing = [p for p in listed if not p.is_file()]
    if missing:
        raise ImageFolderError(
            f"samples folder '{samples_dir}': {len(missing)} image(s) its manifest "
            f"{manifest.path} lists are missing (e.g. {missing[0].name}). Rerun idgen-sample "
            "with the same hydra.run.dir to redo them."
        )
    keep = {p.resolve() for p in listed}
    ignored = [p for p in found if p.resolve() not in keep]
    if ignored:
        log.warning(
            "evaluating the %d image(s) listed in %s; %d other image file(s) in %s are not "
            "scored (e.g. %s): they are not in the current sampling plan (left by an earlier "
            "run with more images per prompt, other prompts or other settings) and stay on disk",
            len(listed),
            manifest.path,
            len(ignored),
            samples_dir,
            ", ".join(p.name for p in ignored[:3]),
        )
    return ScoredImages(sorted(listed), ignored, manifest.path)
