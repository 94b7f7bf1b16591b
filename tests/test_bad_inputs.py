"""Bad command lines: one clear early error (field, value, what to do), exit code 2, nothing written.

Each case runs the real entry point (Hydra parses the argv, ``cli_errors`` turns the error into
one line) in-process; one case per CLI also runs as a subprocess for the real exit status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from idgen.preflight import validate_sample
from idgen.utils.task import accept_null_groups
from idgen.utils.validation import ConfigError
from tests.conftest import REPO, compose_config, run_python


@pytest.fixture
def places(tmp_path):
    """A file, an empty folder and a folder with one image, for the path cases."""
    from PIL import Image

    (tmp_path / "a_file.txt").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "images" / "x.png")
    (tmp_path / "prompts_empty.txt").write_text("# only a comment\n\n")
    return tmp_path


def run_main(module: str, tmp_path: Path, argv: list[str], monkeypatch, capsys):
    """Run ``module.main()`` as the console script would; returns (exit code, stderr)."""
    import importlib

    main = importlib.import_module(module).main
    GlobalHydra.instance().clear()
    monkeypatch.setattr(
        sys,
        "argv",
        [module, f"hydra.run.dir={tmp_path / 'run'}", f"paths.root_dir={tmp_path}", *argv],
    )
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def written(run: Path) -> list[str]:
    """What the run left besides Hydra's own bookkeeping (.hydra/, the job log)."""
    if not run.exists():
        return []
    return sorted(
        str(p.relative_to(run))
        for p in run.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    )


TRAIN_CASES = [
    # (overrides, text the one-line message must contain)
    (["data.resolution=63"], "data.resolution=63: must be a multiple of 8"),
    (["data.resolution=0"], "data.resolution=0: must be >= 8"),
    (["data.resolution=abc"], "data.resolution='abc': must be an integer"),
    (["stage=bogus"], "stage='bogus': is not one of inversion, finetune, all, data"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5: must be >= 1"),
    (["inversion_steps=0"], "inversion_steps=0: must be >= 1"),
    (["module.optimizer.lr=nan"], "module.optimizer.lr=nan: must be finite"),
    (["nonfinite_loss=ignore"], "nonfinite_loss='ignore': is not one of stop, skip"),
    (["callbacks.model_checkpoint.save_top_k=-2"], "save_top_k=-2: must be >= -1"),
    (["callbacks.ema.decay=1"], "callbacks.ema.decay=1.0: must be < 1.0"),
    (["data=folder"], "data.root=<unset>: is required"),
    (["data=folder", "data.root={tmp}/a_file.txt"], "is a file, not a folder"),
    (["data=folder", "data.root={tmp}/nope"], "does not exist"),
    (["data=folder", "data.root={tmp}/empty"], "data.root='{tmp}/empty': holds no files"),
    (["model=sd15", "model.pretrained={tmp}/empty"], "model.pretrained='{tmp}/empty'"),
    (["ckpt_path={tmp}/nope.ckpt"], "ckpt_path='{tmp}/nope.ckpt'"),
    (["stage=finetune", "text_features={tmp}/nope.safetensors"], "text_features="),
]


@pytest.mark.parametrize("overrides,message", TRAIN_CASES, ids=lambda c: str(c)[:40])
def test_idgen_train_bad_input(places, monkeypatch, capsys, overrides, message):
    tmp = str(places)
    argv = [o.replace("{tmp}", tmp) for o in overrides]
    code, err = run_main("idgen.train", places, argv, monkeypatch, capsys)
    assert code == 2
    assert message.replace("{tmp}", tmp) in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert written(places / "run") == []  # no config.yaml, data, checkpoints
    assert not (places / "data").exists()  # the demo data was not generated either


EVAL_CASES = [
    ([], "samples_dir=None: is not set"),
    (["samples_dir={tmp}/nope"], "samples folder '{tmp}/nope' does not exist"),
    (["samples_dir={tmp}/a_file.txt"], "is a file, not a folder"),
    (["samples_dir={tmp}/empty"], "holds no files"),
    (["samples_dir={tmp}/images"], "reference_dir=None: is required by FID/KID"),
    (["samples_dir={tmp}/images", "reference_dir={tmp}/nope"], "reference_dir='{tmp}/nope'"),
    (["samples_dir={tmp}/images", "resolution=0"], "resolution=0: must be >= 1"),
    (["samples_dir={tmp}/images", "resolution=abc"], "resolution='abc': must be an integer"),
    (["samples_dir={tmp}/images", "batch_size=0"], "batch_size=0: must be >= 1"),
    (["samples_dir={tmp}/images", "device=gpu0"], "device='gpu0': is not a device"),
]


@pytest.mark.parametrize("overrides,message", EVAL_CASES, ids=lambda c: str(c)[:40])
def test_idgen_eval_bad_input(places, monkeypatch, capsys, overrides, message):
    tmp = str(places)
    argv = [o.replace("{tmp}", tmp) for o in overrides] + ["logger=null"]
    code, err = run_main("idgen.evaluate", places, argv, monkeypatch, capsys)
    assert code == 2
    assert message.replace("{tmp}", tmp) in err
    assert "Traceback" not in err
    assert written(places / "run") == []  # no metrics.json, no config.yaml


def _domain_model(tmp_path: Path, tiny_sd, **unet_overrides) -> Path:
    """An exported NullTextUNet (optionally of another geometry) without training."""
    from diffusers import UNet2DConditionModel

    from idgen.models import NullTextUNet
    from idgen.modules.export import export_domain_model

    unet = tiny_sd.unet
    if unet_overrides:
        unet = UNet2DConditionModel.from_config({**dict(unet.config), **unet_overrides})
    dim = unet.config.cross_attention_dim
    domain = NullTextUNet.from_unet(unet, torch.randn(1, 77, dim))
    name = "domain_" + "_".join(f"{k}{v}" for k, v in unet_overrides.items())
    return export_domain_model(domain, tmp_path / name, metadata={"base_model": "tiny"})


def sample_cases(tmp_path: Path, tiny_sd) -> list[tuple[list[str], str]]:
    plain_unet = tmp_path / "plain_unet"
    tiny_sd.unet.save_pretrained(plain_unet)
    good = _domain_model(tmp_path, tiny_sd)
    other_base = tmp_path / "other_base"
    import shutil

    shutil.copytree(good, other_base)
    meta = json.loads((other_base / "idgen_domain.json").read_text())
    (other_base / "idgen_domain.json").write_text(json.dumps({**meta, "base_model": "/sd21"}))
    return [
        (["sampler.w_d=nan"], "sampler.w_d=nan: must be finite"),
        (["sampler.w_c=inf"], "sampler.w_c=inf: must be finite"),
        (["sampler.w0=nan"], "sampler.w0=nan"),
        (["sampler.num_inference_steps=0"], "sampler.num_inference_steps=0: must be >= 1"),
        (["sampler.scheduler=Bogus"], "sampler.scheduler='Bogus': is not a scheduler"),
        (["sampler.weights=sometimes"], "sampler.weights='sometimes'"),
        (["sampler.domain_interval=[0.6,0.2]"], "sampler.domain_interval=[0.6, 0.2]"),
        (["resolution=63"], "resolution=63: must be a multiple of 8"),
        (["images_per_prompt=0"], "images_per_prompt=0"),
        (["batch_size=-1"], "batch_size=-1"),
        (["prompts=[]"], "no prompt given"),
        ([f"prompt_file={tmp_path}/prompts_empty.txt"], "holds no prompts"),
        ([f"prompt_file={tmp_path}/nope.txt"], "prompt_file="),
        ([f"domain_model={tmp_path}/nope"], "domain_model="),
        ([f"domain_model={tmp_path}/empty"], "holds no files"),
        ([f"domain_model={plain_unet}"], "holds a UNet2DConditionModel model, not an idgen"),
        (
            [f"domain_model={_domain_model(tmp_path, tiny_sd, in_channels=8, out_channels=8)}"],
            "latent channels 8 (base model: 4)",
        ),
        (
            [f"domain_model={_domain_model(tmp_path, tiny_sd, sample_size=16)}"],
            "latent sample size 16 (base model: 8)",
        ),
        (["+model.cross_attention_dim=64", f"domain_model={good}"], "cross-attention width 32"),
        ([f"domain_model={other_base}"], "trained on base '/sd21'"),
        ([f"baseline_model={tmp_path}/nope"], "baseline_model="),
    ]


def test_idgen_sample_bad_inputs(places, tiny_sd):
    """Every case fails in validate_sample (before any model loads), naming field and value."""
    for overrides, message in sample_cases(places, tiny_sd):
        cfg = compose_config("sample", places, overrides)
        with pytest.raises(ConfigError) as info:
            validate_sample(cfg)
        assert message in str(info.value), (overrides, str(info.value))
    # and a matching export passes
    good = _domain_model(places / "ok", tiny_sd)
    validate_sample(compose_config("sample", places, [f"domain_model={good}"]))


def test_idgen_sample_cli_exit_code(places, monkeypatch, capsys):
    code, err = run_main("idgen.sample", places, ["sampler.w_d=nan"], monkeypatch, capsys)
    assert code == 2 and "sampler.w_d=nan: must be finite" in err and "Traceback" not in err
    assert written(places / "run") == []  # no PNG, no samples.jsonl


@pytest.mark.slow
def test_subprocess_exit_status_and_single_line(places):
    """The installed entry point's real exit status and stderr (no Hydra traceback)."""
    cmd = ["-m", "idgen.train", f"hydra.run.dir={places / 'run'}", "stage=bogus"]
    result = run_python(cmd, places, root=places, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: stage='bogus'")
    assert "Traceback" not in result.stderr


def test_null_config_groups_are_accepted(places, monkeypatch, capsys):
    """``logger=null`` (as the README lists) means no logger, not a Hydra traceback."""
    conf = REPO / "idgen" / "conf"
    assert accept_null_groups(["x", "logger=null", "seed=null", "callbacks=none"], conf) == [
        "x",
        "~logger",
        "seed=null",  # not a config group: left as is
        "callbacks=none",  # a real config named none.yaml
    ]
    argv = ["logger=null", "stage=data", "preview.enabled=false", "data.num_images=4"]
    code, err = run_main("idgen.train", places, argv, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    run = places / "run"
    assert (run / "data_manifest.txt").is_file() and not (run / "csv").exists()
