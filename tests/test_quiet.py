"""Library noise is filtered, our lines and other warnings are not; extraction shows a bar."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from PIL import Image

import idgen  # noqa: F401  (installs the filters)
from idgen.metrics import TinyFeatureExtractor
from idgen.metrics.features import extract_features


def test_lightning_banners_and_tips_dropped_other_lines_kept(caplog):
    caplog.set_level(logging.INFO)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    rank_zero_info("Restoring states from the checkpoint path at x.ckpt")
    text = caplog.text
    assert "GPU available" not in text and "TPU available" not in text and "Tip:" not in text
    assert "Restoring states from the checkpoint" in text


def test_only_the_known_deprecation_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import idgen.utils.quiet as quiet

        quiet.quiet_libraries()  # re-install after simplefilter reset the list
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning, stacklevel=1
        )
        warnings.warn(  # Lightning's, at every fit: our frozen parts are in eval mode on purpose
            "Found 185 module(s) in eval mode at the start of training. This may lead to ...",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("something of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something of ours"]


def test_feature_extraction_progress_bar(tmp_path, monkeypatch):
    import tqdm.auto

    seen = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        bar = real(*args, **{**kwargs, "disable": False})
        seen.append(bar)
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(path)
        paths.append(path)
    extract_features(TinyFeatureExtractor(input_size=16), paths, batch_size=2, desc="samples")
    (bar,) = seen
    assert bar.total == 5 and bar.n == 5 and bar.desc.startswith("samples")
