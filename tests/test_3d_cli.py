"""idgen-3d: every config composes, a few steps run on the tiny preset, outputs, resume.

The commands in docs and config headers are composed by tests/test_docs.py."""

from __future__ import annotations

import json
import logging
import math

import imageio.v3 as iio
import pytest
import trimesh
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from idgen import CONFIG_DIR
from idgen.text_to_3d import text_to_3d
from tests.conftest import compose_config

# A small scene so that a step takes well under a second on one CPU thread.
FAST = [
    "scene.render_resolution=16",
    "scene.nerf.resolution=12",
    "scene.nerf.num_samples=12",
    "batch_size=2",
    "eval.num_views=2",
    "turntable.num_views=3",
    "progress_bar=false",
    "mesh.threshold=2.0",
]


@pytest.mark.parametrize("scene", ["tiny", "toyworld", "sd15"])
@pytest.mark.parametrize("sds", ["default", "toyworld", "sd15"])
def test_every_scene_and_sds_config_composes(scene, sds):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("3d", overrides=[f"scene={scene}", f"sds={sds}"])
    assert cfg.scene.nerf._target_ == "idgen.scene.VoxelNeRF"
    assert cfg.sds.timesteps._target_ == "idgen.sds.TimestepSchedule"


def test_runs_a_few_steps_writes_outputs_and_resumes(tmp_path):
    cfg = compose_config("3d", tmp_path, [*FAST, "steps=3", "checkpoint_every=2"])
    summary = text_to_3d(cfg)
    run = tmp_path / "run"
    for name in ("turntable.gif", "views.png", "loss.png", "metrics.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["resumed_from"] == 0
    assert math.isfinite(metrics["final_sds_loss"])
    assert metrics["guidance_weights"]["control"] > 0  # automatic weight, held
    assert iio.imread(run / "turntable.gif", index=None).shape[0] == 3
    mesh = trimesh.load(run / "mesh.ply", force="mesh")
    assert len(mesh.faces) == metrics["mesh"]["faces"] > 0
    assert summary["mesh"]["watertight"] == mesh.is_watertight

    # Resume: 2 more steps continue the checkpoint and its loss history.
    cfg = compose_config("3d", tmp_path, [*FAST, "steps=5", "checkpoint_every=2"])
    again = text_to_3d(cfg)
    assert again["resumed_from"] == 3 and again["steps"] == 5
    assert again["guidance_weights"] == metrics["guidance_weights"]

    # Another prompt in the same run dir is refused, naming the way out.
    cfg = compose_config("3d", tmp_path, [*FAST, "steps=6", "prompt=a blue square"])
    with pytest.raises(ValueError, match="another prompt"):
        text_to_3d(cfg)


def test_domain_term_and_image_init_on_the_tiny_preset(tmp_path):
    import numpy as np
    from PIL import Image

    from idgen.models import NullTextUNet, build_tiny_sd

    sd = build_tiny_sd(seed=0)
    feats = sd.encode_prompt("a photo of a shape", "cpu", 1, False)[0]
    NullTextUNet.from_unet(sd.unet, feats, init="value").save_pretrained(tmp_path / "domain")
    image = np.full((32, 32, 3), 20, np.uint8)
    image[8:24, 8:24] = (220, 40, 40)
    Image.fromarray(image).save(tmp_path / "init.png")
    cfg = compose_config(
        "3d",
        tmp_path,
        [
            *FAST,
            "steps=2",
            f"domain_model={tmp_path / 'domain'}",
            "sds.w_d=1.5",
            "sds.w_c=2.0",
            "sds.target=image",
            f"init.image={tmp_path / 'init.png'}",
            "eval.toyworld=true",
            "prompt=a red square",
        ],
    )
    summary = text_to_3d(cfg)
    assert summary["guidance_weights"] == {"domain": 1.5, "control": 2.0}
    assert summary["init"]["foreground_fraction"] == pytest.approx(0.25, abs=0.02)
    assert summary["toyworld"]["target_colour"] == "red"
    assert 0.0 <= summary["toyworld"]["dark_fraction"] <= 1.0


def test_bad_inputs_fail_early(tmp_path):
    cfg = compose_config("3d", tmp_path, [*FAST, f"domain_model={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="domain_model"):
        text_to_3d(cfg)
    cfg = compose_config("3d", tmp_path, [*FAST, "dtype=float8"])
    # The project's one dtype parser: the field, the value and the accepted names.
    with pytest.raises(ValueError, match=r"dtype='float8'.*'bfloat16', 'float16', 'float32'"):
        text_to_3d(cfg)
    cfg = compose_config("3d", tmp_path, [*FAST, "init.image=a.png", "init.mesh=b.obj"])
    with pytest.raises(ValueError, match="exclusive"):
        text_to_3d(cfg)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    import torch

    straight = compose_config("3d", tmp_path / "a", [*FAST, "steps=4", "checkpoint_every=0"])
    text_to_3d(straight)
    first = compose_config("3d", tmp_path / "b", [*FAST, "steps=2", "checkpoint_every=0"])
    text_to_3d(first)
    text_to_3d(compose_config("3d", tmp_path / "b", [*FAST, "steps=4", "checkpoint_every=0"]))
    a = torch.load(tmp_path / "a/run/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "b/run/checkpoints/last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    torch.testing.assert_close(a["nerf"]["grid"], b["nerf"]["grid"])
    assert a["history"]["sds"] == pytest.approx(b["history"]["sds"])


def test_the_task_wrapper_runs_idgen_3d_and_logs_its_run_dir(tmp_path, caplog):
    """The CLI's shape (as every idgen CLI) is checked in tests/test_task.py."""
    from idgen import text_to_3d as cli

    # The task wrapper runs the task and logs the run dir; no optimized_metric: returns None.
    cfg = compose_config("3d", tmp_path, [*FAST, "steps=1", "dtype=fp32"])
    with caplog.at_level(logging.INFO):
        assert cli.main.__wrapped__(cfg) is None
    assert f"run dir: {tmp_path / 'run'}" in caplog.text
    assert (tmp_path / "run" / "metrics.json").is_file()
