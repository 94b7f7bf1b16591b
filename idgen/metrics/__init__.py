"""Evaluation metrics: FID/KID (torchmetrics), CLIP score and attribute alignment, canny discrepancy."""

from idgen.metrics.canny import canny_discrepancy, canny_edges
from idgen.metrics.clip import (
    Attribute,
    CLIPLoadError,
    attribute_alignment,
    clip_loader,
    clip_score,
    load_clip,
)
from idgen.metrics.features import (
    FeatureExtractorError,
    InceptionFeatures,
    TinyFeatureExtractor,
    extract_features,
    extractor_id,
)
from idgen.metrics.fid import fid_from_features, kid_from_features
from idgen.metrics.fidelity import fid_kid, reference_features
from idgen.metrics.images import ImageFolderError, list_images, load_uint8
from idgen.metrics.results import read_metrics, write_metrics

__all__ = [
    "Attribute",
    "CLIPLoadError",
    "FeatureExtractorError",
    "ImageFolderError",
    "InceptionFeatures",
    "TinyFeatureExtractor",
    "attribute_alignment",
    "canny_discrepancy",
    "canny_edges",
    "clip_loader",
    "clip_score",
    "extract_features",
    "extractor_id",
    "fid_from_features",
    "fid_kid",
    "kid_from_features",
    "list_images",
    "load_clip",
    "load_uint8",
    "read_metrics",
    "reference_features",
    "write_metrics",
]
