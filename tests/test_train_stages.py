"""idgen-train's training stages end to end on the tiny preset (in-process, tmp dirs)."""

from __future__ import annotations

import pytest
import torch

from idgen.models import NullTextUNet
from idgen.modules.sd_parts import load_text_features, read_text_features_metadata
from idgen.train import train
from tests.conftest import job_config

FAST = [
    "experiment=demo",
    "data.num_images=8",
    "data.batch_size=4",
    "inversion_steps=2",
    "trainer.max_steps=2",
    "preview.enabled=false",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.decoupled_sampling.every_n_train_steps=2",
    "callbacks.decoupled_sampling.settings.num_inference_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
]


def test_stage_all_runs_inversion_then_finetune_and_exports(tmp_path):
    cfg = job_config("train", tmp_path, FAST)
    metrics = train(cfg)
    run = tmp_path / "run"
    features = run / "inversion" / "text_features.safetensors"
    meta = read_text_features_metadata(features)
    assert meta["prompt"] == f"a photo of {cfg.domain}" and meta["steps"] == "2"
    export = run / "domain_model"
    model = NullTextUNet.from_pretrained(export)
    # stage 2 started from stage 1's features: they travel with the export
    torch.testing.assert_close(load_text_features(export), load_text_features(features))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "validation" / "step_0000002_p0000.png").is_file()
    assert "train/loss" in metrics and "inversion/train/loss" in metrics
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([5])).sample.shape == (1, 4, 8, 8)


@pytest.mark.slow
def test_stage_finetune_takes_features_and_resumes_from_last(tmp_path):
    features = tmp_path / "tf.safetensors"
    from idgen.modules.sd_parts import save_text_features

    save_text_features(features, torch.randn(1, 77, 32), {"prompt": "given"})
    overrides = [*FAST, "stage=finetune", f"text_features={features}"]
    train(job_config("train", tmp_path, overrides))
    run = tmp_path / "run"
    assert not (run / "inversion").exists()
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2
    torch.testing.assert_close(
        load_text_features(run / "domain_model"), load_text_features(features)
    )

    # same run dir, more steps, ckpt_path=last: continues from step 2
    train(job_config("train", tmp_path, [*overrides, "trainer.max_steps=4", "ckpt_path=last"]))
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 4 and second["ema"]["num_updates"] == 4


def test_unknown_stage_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="stage='both'"):
        train(job_config("train", tmp_path, [*FAST, "stage=both"]))
