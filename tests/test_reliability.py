"""Nothing silently wrong, and resumes that lose nothing (in-process; see test_kill_resume for kill -9)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.data.images import load_rgb
from idgen.modules.checkpoint_io import newest_complete_checkpoint
from idgen.train import train
from idgen.utils.validation import (
    ConfigError,
    NonFiniteError,
    NonFiniteLossError,
    assert_finite_images,
    is_finite,
    remove_stale_temp_files,
)
from tests.conftest import job_config

FAST = [
    "stage=finetune",
    "preview.enabled=false",
    "data.num_images=16",
    "data.batch_size=4",  # 4 batches per epoch: checkpoints at steps 2, 6 fall mid-epoch
    "callbacks.decoupled_sampling.every_n_train_steps=null",
    "callbacks.ema.decay=0.9",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


def _state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["ema"]["shadow"].items()}}


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "csv" / "metrics.csv").open()))


# ----------------------------------------------------------------------------- images, guards


def test_16bit_image_scaled_by_bit_depth_not_by_maximum(tmp_path):
    """All values <= 255 in a 16-bit PNG: a very dark image, not an 8-bit one."""
    values = np.array([[0, 200], [255, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "dark16.png")  # mode I;16
    with Image.open(tmp_path / "dark16.png") as image:
        assert image.mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "dark16.png"))
    expected = np.floor(values / 65535 * 255 + 0.5).astype(np.uint8)  # 0, 1, 1, 255
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert (rgb[..., 0] == rgb[..., 2]).all()
    small = np.array([[0, 200], [255, 255]], dtype=np.uint16)  # max <= 255: still 16-bit
    Image.fromarray(small).save(tmp_path / "small16.png")
    assert np.asarray(load_rgb(tmp_path / "small16.png")).max() == 1


def test_finite_guards():
    assert is_finite({"a": torch.ones(2), "w": [1.0, 2.0], "s": "x"})
    assert not is_finite({"w": {"domain": float("nan")}})
    assert not is_finite(np.array([1.0, np.inf]))
    assert is_finite(np.array([1, 2], dtype=np.uint8))
    item = {"index": 3, "prompt": "p", "image": Image.new("RGB", (4, 4))}
    assert_finite_images([{**item, "guidance_weights": {"w_d": 1.0}}])
    with pytest.raises(NonFiniteError, match="sample 3 .* non-finite guidance_weights"):
        assert_finite_images([{**item, "guidance_weights": {"w_d": float("nan")}}])
    with pytest.raises(NonFiniteError, match="image"):
        assert_finite_images([{**item, "image": torch.tensor([0.5, float("nan")])}])


def test_stale_temp_files_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    partial = tmp_path / "checkpoints" / ".step_0000004.ckpt.abc123.tmp"
    partial.write_bytes(b"half")
    export_tmp = tmp_path / ".domain_model.k2j3h4"
    export_tmp.mkdir()
    (export_tmp / "config.json").write_text("{}")
    keep = [tmp_path / "checkpoints" / "step_0000002.ckpt", tmp_path / ".hydra" / "config.yaml"]
    for path in keep:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([partial, export_tmp])
    assert all(p.exists() for p in keep) and not partial.exists() and not export_tmp.exists()


# ------------------------------------------------------------------------------ NaN training


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    cfg = job_config(
        "train",
        tmp_path,
        [
            *FAST,
            "trainer.max_steps=5",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "+callbacks.nan._target_=tests.kill_helpers.NaNBatchAt",
            "+callbacks.nan.step=3",
        ],
    )
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "loss (nan) is NaN/inf at global step 3" in message
    assert "step_0000002.ckpt (step 2)" in message and "nonfinite_loss=skip" in message
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_0000002.ckpt"]
    assert not (tmp_path / "run" / "domain_model").exists()  # nothing exported from a NaN run
    assert all(torch.isfinite(v).all() for v in _state(ckpts / "last.ckpt").values())


def test_nan_loss_skip_counts_and_leaves_weights_finite(tmp_path):
    cfg = job_config(
        "train",
        tmp_path,
        [
            *FAST,
            "trainer.max_steps=4",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "nonfinite_loss=skip",
            "+callbacks.nan._target_=tests.kill_helpers.NaNBatchAt",
            "+callbacks.nan.step=1",
        ],
    )
    train(cfg)
    run = tmp_path / "run"
    state = _state(run / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in state.values())
    skipped = [r["train/nonfinite_skipped"] for r in _rows(run) if r.get("train/nonfinite_skipped")]
    assert [float(s) for s in skipped] == [0.0, 1.0, 1.0, 1.0]  # step 2 was skipped
    assert (run / "domain_model").is_dir()


# ---------------------------------------------------------------------------------- resuming


def test_resume_picks_newest_complete_checkpoint_prunes_to_top_k_and_equals_uninterrupted(
    tmp_path,
):
    """A kill between step_4.ckpt and last.ckpt (last.ckpt still says step 2), a truncated
    checkpoint and a partial temp file: the resume starts at step 4, keeps exactly top-k files,
    and ends with the weights of an uninterrupted run; the CSV keeps every step once."""
    ref_root, root = tmp_path / "ref", tmp_path / "crash"
    train(job_config("train", ref_root, [*FAST, "trainer.max_steps=6"]))

    train(
        job_config(
            "train",
            root,
            [*FAST, "trainer.max_steps=4", "callbacks.model_checkpoint.save_top_k=-1"],
        )
    )
    ckpts = root / "run" / "checkpoints"
    shutil.copy(ckpts / "step_0000002.ckpt", ckpts / "last.ckpt")  # last.ckpt lags behind
    data = (ckpts / "step_0000004.ckpt").read_bytes()
    (ckpts / "step_0000005.ckpt").write_bytes(data[: len(data) // 2])  # cut short, real name
    (ckpts / ".step_0000005.ckpt.x1y2.tmp").write_bytes(data[:100])  # an interrupted atomic write
    assert newest_complete_checkpoint(ckpts)[1] == 4

    train(
        job_config(
            "train",
            root,
            [
                *FAST,
                "trainer.max_steps=6",
                "ckpt_path=last",
                "callbacks.model_checkpoint.save_top_k=2",
            ],
        )
    )
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["last.ckpt", "step_0000005.ckpt", "step_0000006.ckpt"]  # exactly top-2
    ours, ref = _state(ckpts / "last.ckpt"), _state(ref_root / "run" / "checkpoints" / "last.ckpt")
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)
    ours_rows, ref_rows = _rows(root / "run"), _rows(ref_root / "run")
    steps = [r["step"] for r in ours_rows if r.get("train/loss")]
    assert steps == [str(i) for i in range(6)]  # continued: none lost, none doubled
    assert [r["train/loss"] for r in ours_rows if r.get("train/loss")] == [
        r["train/loss"] for r in ref_rows if r.get("train/loss")
    ]


def test_rerun_without_ckpt_path_is_refused_and_finished_stage1_is_reused(tmp_path):
    overrides = [
        *[o for o in FAST if o != "stage=finetune"],
        "stage=all",
        "inversion_steps=2",
        "trainer.max_steps=2",
    ]
    train(job_config("train", tmp_path, overrides))
    features = tmp_path / "run" / "inversion" / "text_features.safetensors"
    before = (features.stat().st_mtime_ns, features.read_bytes())
    with pytest.raises(ConfigError, match="ckpt_path=None: .* already holds checkpoints"):
        train(job_config("train", tmp_path, overrides))
    more = [*overrides, "trainer.max_steps=3", "ckpt_path=last"]
    train(job_config("train", tmp_path, more))
    assert (features.stat().st_mtime_ns, features.read_bytes()) == before  # not re-run
    assert len([r for r in _rows(tmp_path / "run") if r.get("train/loss")]) == 3
    with pytest.raises(ConfigError, match="holds a finished stage 1 .* steps '2' \\(now '3'\\)"):
        train(job_config("train", tmp_path, [*more, "inversion_steps=3"]))
