"""Errors that came late, with the wrong key or as tracebacks (issue 23, items 5 and 6).

Each case runs the real entry point (``main()`` as the console script does) and asserts: exit
code 2, one ``error:`` line naming the real config key and value and what to do, no traceback,
and nothing heavy done first (no preview, no samples). The last test checks that every key an
error names is a real path of the composed config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from idgen.preflight import DEMO_DOMAIN, validate_3d, validate_eval, validate_sample, validate_train
from idgen.utils.validation import ConfigError
from tests.conftest import compose_config
from tests.test_bad_inputs import TRAIN_CASES, _domain_model, run_main, written


def one_error(code: int, err: str, *needles: str) -> str:
    """The single ``error:`` line of a CLI that exited 2, checked to contain ``needles``."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 20, 30)).save(folder / f"{i}.png")
    return folder


# ----------------------------------------------------------------------------- Inception weights


def test_missing_inception_weights_file_names_the_real_key_before_sampling(
    tmp_path, images, monkeypatch, capsys
):
    argv = [
        "metrics=inception",
        f"metrics.fid.extractor.weights_path={tmp_path}/nope.pth",
        f"reference_dir={images}",
        # sample first: the error must come before any image is sampled
        "sample={images_subdir: samples, w_d: 0, overrides: ['sampler=cfg']}",
        "logger=null",
    ]
    code, err = run_main("idgen.evaluate", tmp_path, argv, monkeypatch, capsys)
    one_error(
        code, err, f"metrics.fid.extractor.weights_path='{tmp_path}/nope.pth'", "does not exist"
    )
    assert "metrics.fid.weights_path" not in err  # the old, wrong key
    assert written(tmp_path / "run") == []  # nothing sampled, no metrics.json


def test_offline_without_inception_weights_is_said_up_front(tmp_path, images, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    argv = ["metrics=inception", f"samples_dir={images}", f"reference_dir={images}", "logger=null"]
    code, err = run_main("idgen.evaluate", tmp_path, argv, monkeypatch, capsys)
    one_error(code, err, "metrics.fid.extractor.weights_path=None", "cannot be downloaded offline")


# ----------------------------------------------------------------------------- trainer=gpu


def test_gpu_trainer_without_cuda_fails_before_the_previews(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    argv = ["trainer=gpu", "data.num_images=4", "logger=null"]
    code, err = run_main("idgen.train", tmp_path, argv, monkeypatch, capsys)
    one_error(code, err, "trainer.accelerator='gpu'", "no CUDA GPU", "trainer=cpu")
    assert written(tmp_path / "run") == []  # no base_grid.png, no data_grid.png
    assert not (tmp_path / "data").exists()  # the demo data was not generated


def test_sample_device_and_eval_device_need_cuda(tmp_path, images, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config("sample", tmp_path, ["trainer=gpu", "sampler=cfg"])
    with pytest.raises(ConfigError, match="trainer.accelerator='gpu': no CUDA GPU"):
        validate_sample(cfg)
    cfg = compose_config(
        "eval", tmp_path, [f"samples_dir={images}", f"reference_dir={images}", "device=cuda"]
    )
    with pytest.raises(ConfigError, match="device='cuda': no CUDA GPU"):
        validate_eval(cfg)


# ----------------------------------------------------------------------------- no usable images


def test_folder_without_usable_images_is_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "broken"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_text("not an image")
    argv = [
        "data=folder",
        f"data.root={bad}",
        "data.resolution=16",
        "domain=face",
        "preview.enabled=false",
        "logger=null",
    ]
    code, err = run_main("idgen.train", tmp_path, argv, monkeypatch, capsys)
    one_error(code, err, f"data.root='{bad}'", "none is usable", "x0.png")


def test_reference_folder_without_usable_images_is_one_line(tmp_path, images, monkeypatch, capsys):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    argv = [f"samples_dir={images}", f"reference_dir={bad}", "logger=null"]
    code, err = run_main("idgen.evaluate", tmp_path, argv, monkeypatch, capsys)
    one_error(code, err, f"reference_dir='{bad}'", "none is usable")


# ----------------------------------------------------------------------------- idgen-3d


def test_3d_refuses_a_domain_model_of_another_base(tmp_path, tiny_sd, monkeypatch, capsys):
    domain = _domain_model(tmp_path, tiny_sd)  # made for model=tiny
    argv = ["model=toyworld", "scene=toyworld", f"domain_model={domain}", "steps=1"]
    code, err = run_main("idgen.text_to_3d", tmp_path, argv, monkeypatch, capsys)
    one_error(code, err, f"domain_model='{domain}'", "was trained for another base model")
    assert written(tmp_path / "run") == []
    # the same export on its own base passes idgen-3d's checks
    validate_3d(compose_config("3d", tmp_path, [f"domain_model={domain}"]))


def test_3d_negative_weight(tmp_path, monkeypatch, capsys):
    code, err = run_main("idgen.text_to_3d", tmp_path, ["sds.w_d=-1"], monkeypatch, capsys)
    one_error(code, err, "sds.w_d=-1.0: is negative")


# ----------------------------------------------------------------------------- sampler weights


@pytest.mark.parametrize("key", ["sampler.w_d", "sampler.w_c"])
def test_negative_guidance_weight_is_refused(tmp_path, tiny_sd, key):
    domain = _domain_model(tmp_path, tiny_sd)
    cfg = compose_config("sample", tmp_path, [f"domain_model={domain}", f"{key}=-3"])
    with pytest.raises(ConfigError, match=f"{key}=-3.0: is negative") as info:
        validate_sample(cfg)
    assert "null (automatic) or a number >= 0" in str(info.value)
    # 0 (the term off) and null (automatic) stay allowed
    for value in ("0", "null", "2.5"):
        validate_sample(
            compose_config("sample", tmp_path, [f"domain_model={domain}", f"{key}={value}"])
        )


def test_negative_weight_in_the_eval_sample_hook(tmp_path, images):
    cfg = compose_config(
        "eval", tmp_path, [f"reference_dir={images}", "sample={images_subdir: s, w_d: -3}"]
    )
    with pytest.raises(ConfigError, match="sample.w_d=-3.0: is negative"):
        validate_eval(cfg)


# ----------------------------------------------------------------------------- no domain model


def test_decoupled_sampling_without_domain_model_says_what_to_pass(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a face\n")
    argv = [f"prompt_file={prompts}"]
    code, err = run_main("idgen.sample", tmp_path, argv, monkeypatch, capsys)
    line = one_error(code, err, "domain_model=None", "domain_model=<", "sampler=cfg")
    assert "NullTextUNet" not in line  # not a Python argument
    assert written(tmp_path / "run") == []  # before any model loads: nothing sampled


def test_eval_sample_hook_without_domain_model_names_the_hook_fields(tmp_path, images):
    cfg = compose_config(
        "eval", tmp_path, [f"reference_dir={images}", "sample={images_subdir: samples}"]
    )
    with pytest.raises(ConfigError) as info:
        validate_eval(cfg)
    message = str(info.value)
    assert message.startswith("sample.domain_model=None")
    assert "sample.domain_model=<" in message and "sample.sampler=cfg" in message


# ----------------------------------------------------------------------------- domain= (item 6)


def test_folder_run_without_domain_is_an_error_naming_domain(tmp_path, images, monkeypatch, capsys):
    argv = ["data=folder", f"data.root={images}", "data.resolution=16", "logger=null"]
    code, err = run_main("idgen.train", tmp_path, argv, monkeypatch, capsys)
    one_error(code, err, f"domain='{DEMO_DOMAIN}'", "a photo of coloured shapes", "domain=face")
    assert written(tmp_path / "run") == []
    # with domain= the same command passes the checks; generated data keeps its default
    validate_train(compose_config("train", tmp_path, [*argv[:3], "domain=face"]))
    validate_train(compose_config("train", tmp_path, []))


def test_demo_domain_is_train_yaml_default(tmp_path):
    """The check compares with train.yaml's default: the two must not drift apart."""
    assert compose_config("train", tmp_path, []).domain == DEMO_DOMAIN


# ----------------------------------------------------------------------------- keys compose


def _config_errors(tmp_path: Path, images: Path, tiny_sd) -> list[tuple[str, list, str, object]]:
    """(config, overrides, key named by the error, the composed config) for the errors above
    and a few of the older ones (tests/test_bad_inputs.py)."""
    domain = _domain_model(tmp_path, tiny_sd)
    toy = _domain_model(tmp_path / "toy", tiny_sd)
    shutil.copy(domain / "idgen_domain.json", toy / "idgen_domain.json")
    cases = [
        ("sample", ["sampler.w_d=-3", f"domain_model={domain}"]),
        ("sample", ["sampler.w_c=-1", f"domain_model={domain}"]),
        ("sample", []),  # no domain model under sampler=decoupled
        (
            "eval",
            [
                "metrics=inception",
                "metrics.fid.extractor.weights_path=/nope.pth",
                f"samples_dir={images}",
                f"reference_dir={images}",
            ],
        ),  # fmt: skip
        ("eval", [f"reference_dir={images}", "sample={images_subdir: s}"]),
        ("eval", [f"reference_dir={images}", "sample={images_subdir: s, w_d: -3}"]),
        ("train", ["data=folder", f"data.root={images}"]),
        ("3d", ["model=toyworld", f"domain_model={domain}"]),
        ("3d", ["sds.w_c=-2"]),
    ]
    tmp = str(tmp_path)
    cases += [
        ("train", [o.replace("{tmp}", tmp) for o in overrides]) for overrides, _ in TRAIN_CASES[::4]
    ]
    validators = {
        "train": validate_train,
        "sample": validate_sample,
        "eval": validate_eval,
        "3d": validate_3d,
    }
    found = []
    for name, overrides in cases:
        cfg = compose_config(name, tmp_path, overrides)
        try:
            validators[name](cfg)
        except ConfigError as err:
            found.append((name, overrides, err.field, cfg))
        else:
            raise AssertionError(f"no error for {name} {overrides}")
    return found


def test_every_key_an_error_names_composes(tmp_path, images, tiny_sd):
    """The key in ``error: <key>=<value>: ...`` is a real path of the config the user composed
    (``metrics.fid.extractor.weights_path``, not ``metrics.fid.weights_path``)."""
    (tmp_path / "a_file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    missing = object()
    for name, overrides, key, cfg in _config_errors(tmp_path, images, tiny_sd):
        if key.startswith("sample.") and cfg.get("sample") is not None:
            # the eval hook's fields: set or not, each is one of the hook's documented fields
            from idgen.metrics.sample_hook import FIELDS

            assert key[len("sample.") :] in {*FIELDS, *cfg.sample}, (name, overrides, key)
            continue
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=missing) if parent else cfg
        assert node is not missing and last in list(node.keys()), (name, overrides, key)


def test_domain_export_metadata_records_the_base(tmp_path, tiny_sd):
    """What idgen-3d and idgen-sample compare: the export records the base it was made for."""
    meta = json.loads((_domain_model(tmp_path, tiny_sd) / "idgen_domain.json").read_text())
    assert meta["base_model"] == "tiny"
