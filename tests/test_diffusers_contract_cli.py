"""The diffusers habits from the command line: model.pretrained=<single .safetensors>,
sampler.lora=[...] (the frozen SD, as load_lora_weights), LoRAs and single files on one term
only (sampler=control_lora), and preflight refusing files that do not fit before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from idgen.models import build_tiny_sd
from idgen.models.loading import load_sd, sd_pipeline
from idgen.models.single_file import save_single_file
from idgen.pipelines import InDomainPipeline
from idgen.preflight import validate_sample
from idgen.sample import sample
from idgen.sampling import SamplerSettings
from idgen.sampling.components import load_components
from idgen.utils.validation import ConfigError
from tests.conftest import compose_config
from tests.test_bad_inputs import run_main, written
from tests.test_diffusers_contract import _dpm, _has_lora, _run, make_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    original = build_tiny_sd(seed=0)
    original.save_pretrained(root / "folder")
    build_tiny_sd(seed=1).save_pretrained(root / "other_weights")  # same geometry
    build_tiny_sd(seed=0, cross_attention_dim=64).save_pretrained(root / "wide_folder")
    save_single_file(original, root / "community.safetensors")
    make_lora(root / "lora")
    make_lora(root / "wide_lora", cross_attention_dim=64)
    save_file({"weight": torch.zeros(2)}, str(root / "random.safetensors"))
    save_file(
        {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)},
        str(root / "xl.safetensors"),
    )
    save_file(
        {
            "text_encoder_2.a.lora_A.weight": torch.zeros(4, 8),
            "unet.a.lora_A.weight": torch.zeros(4, 8),
        },
        str(root / "xl_lora.safetensors"),
    )
    (root / "old.ckpt").write_bytes(b"pickle")
    return root


def _sample(tmp_path, overrides):
    cfg = compose_config(
        "sample",
        tmp_path,
        [
            "prompts=[a photo of a red circle]",
            "images_per_prompt=1",
            "batch_size=1",
            "resolution=64",
            "sampler=cfg",
            "sampler.num_inference_steps=2",
            *overrides,
        ],
    )
    validate_sample(cfg)
    sample(cfg)
    # pixels of the samples (their PNG metadata name the model they came from)
    return {
        p.name: np.asarray(Image.open(p)).tolist()
        for p in sorted((tmp_path / "run" / "samples").glob("*.png"))
    }


def test_single_file_base_samples_like_its_folder(files, tmp_path):
    """idgen-sample model.pretrained=<file.safetensors> model.config=<folder>: the same PNGs as
    the diffusers folder it was saved from (the config folder has other weights)."""
    folder = _sample(tmp_path / "a", ["model=sd15", f"model.pretrained={files / 'folder'}"])
    single = _sample(
        tmp_path / "b",
        [
            "model=sd15",
            f"model.pretrained={files / 'community.safetensors'}",
            f"model.config={files / 'other_weights'}",
        ],
    )
    assert folder and single == folder


def test_sampler_lora_equals_sd_with_the_lora(files):
    """sampler.lora loads into the frozen SD with its scale (set_adapters), as diffusers does."""
    settings = SamplerSettings(lora=[{"path": str(files / "lora"), "scale": 0.5}])
    parts = load_components(lambda: load_sd(str(files / "folder")), settings)
    assert _has_lora(parts.base.unet) and _has_lora(parts.base.text_encoder)
    ref = load_sd(str(files / "folder"))
    ref.load_lora_weights(str(files / "lora"), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.5])
    ref.scheduler = _dpm(ref.scheduler.config)
    ours = InDomainPipeline.from_sd(parts.base, scheduler=_dpm(ref.scheduler.config))
    torch.testing.assert_close(
        _run(ours, guidance_scale=5.0), _run(ref, guidance_scale=5.0), rtol=1e-5, atol=1e-5
    )


def test_control_lora_sampler_puts_the_lora_on_one_term_only(files, tmp_path):
    """sampler=control_lora: the control term runs a LoRA'd copy of the frozen SD; the frozen SD
    (eps_sd(z,"")) keeps no LoRA. The term's UNet equals SD + the same LoRA."""
    cfg = compose_config(
        "sample",
        tmp_path,
        ["sampler=control_lora", f"sampler.extra_guidance.0.lora=[{{path: {files / 'lora'}}}]"],
    )
    from hydra.utils import instantiate

    settings = instantiate(cfg.sampler)
    parts = load_components(lambda: load_sd(str(files / "folder")), settings)
    term = parts.extra_terms(["a photo"])[0]
    assert term.name == "control" and [t.name for t in settings.guidance_terms()] == ["domain"]
    assert not _has_lora(parts.base.unet) and not _has_lora(parts.base.text_encoder)
    ref = load_sd(str(files / "folder"))
    ref.load_lora_weights(str(files / "lora"))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(term.model(x, t, ctx).sample, ref.unet(x, t, ctx).sample)
        ids = ref.tokenizer(["a photo"], padding="max_length", return_tensors="pt").input_ids
        torch.testing.assert_close(term.text_encoder(ids)[0], ref.text_encoder(ids)[0])


def test_extra_guidance_single_file_model(files):
    """extra_guidance.<i>.model=<community.safetensors>: its UNet and text encoder, read in the
    base's geometry, equal the model it was saved from."""
    settings = SamplerSettings(
        w_d=0.0, w_c=0.0, extra_guidance=[{"model": str(files / "community.safetensors")}]
    )
    parts = load_components(lambda: build_tiny_sd(seed=1), settings)  # base: other weights
    term = parts.extra_terms(["a photo"])[0]
    original = build_tiny_sd(seed=0)
    for mine, theirs in ((term.model, original.unet), (term.text_encoder, original.text_encoder)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[key], value), key


def _cases(root):
    f = root
    return [
        (["model=sd15", f"model.pretrained={f / 'missing.safetensors'}"], "does not exist"),
        (
            ["model=sd15", f"model.pretrained={f / 'random.safetensors'}"],
            "not an SD1.5 single-file",
        ),
        (["model=sd15", f"model.pretrained={f / 'xl.safetensors'}"], "holds an SDXL checkpoint"),
        (["model=sd15", f"model.pretrained={f / 'old.ckpt'}"], "is a pickled checkpoint"),
        (
            [
                "model=sd15",
                f"model.pretrained={f / 'community.safetensors'}",
                f"model.config={f / 'wide_folder'}",
            ],
            "has text width 32, but model.config=",
        ),
        (
            ["model=sd15", f"model.pretrained={f / 'community.safetensors'}", f"model.config={f}"],
            "model.config=",
        ),
        ([f"sampler.lora=[{{path: {f / 'missing'}}}]"], "sampler.lora.0.path="),
        ([f"sampler.lora=[{{path: {f / 'wide_lora'}}}]"], "was made for a base with text width 64"),
        ([f"sampler.lora=[{{path: {f / 'xl_lora.safetensors'}}}]"], "is a LoRA for SDXL"),
        (
            [f"sampler.lora=[{{path: {f / 'lora'}, scale: .nan}}]"],
            "sampler.lora.0.scale='.nan': must be a finite number",
        ),
        (
            [
                "sampler=control_lora",
                f"sampler.extra_guidance.0.lora=[{{path: {f / 'wide_lora'}}}]",
            ],
            "sampler.extra_guidance.0.lora.0.path=",
        ),
        (
            ["sampler=control_lora", f"sampler.extra_guidance.0.model={f / 'xl.safetensors'}"],
            "sampler.extra_guidance.0.model=",
        ),
    ]


def test_preflight_refuses_files_that_do_not_fit(files, tmp_path):
    """Each bad file is named in one ConfigError by validate_sample (headers only, no loading)."""
    for overrides, message in _cases(files):
        cfg = compose_config("sample", tmp_path, overrides)
        with pytest.raises(ConfigError) as info:
            validate_sample(cfg)
        assert message in str(info.value), (overrides, str(info.value))
    good = ["sampler=cfg", f"sampler.lora=[{{path: {files / 'lora'}, scale: 0.5}}]"]
    validate_sample(compose_config("sample", tmp_path, good))


def test_cli_bad_lora_exits_2_and_writes_nothing(files, tmp_path, monkeypatch, capsys):
    argv = [f"sampler.lora=[{{path: {files / 'wide_lora'}}}]"]
    code, err = run_main("idgen.sample", tmp_path, argv, monkeypatch, capsys)
    assert code == 2 and "was made for a base with text width 64" in err and "Traceback" not in err
    assert written(tmp_path / "run") == []


def test_frozen_sd_and_lora_pipeline_parts_are_shared(files):
    """sd_pipeline over LoRA'd parts is what a user gets from diffusers (sanity of the helper)."""
    sd = load_sd(str(files / "folder"))
    pipe = sd_pipeline(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, sd.scheduler)
    pipe.load_lora_weights(str(files / "lora"))
    assert _has_lora(sd.unet)


def test_readme_control_term_only_example_runs():
    """The README's customized-control-term block, run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    marker = "<!-- tested: tests/test_diffusers_contract_cli.py runs this block -->"
    assert marker in text
    block = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert len(scope["images"]) == 1
