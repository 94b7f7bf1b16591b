"""idgen-sample: files, metadata, resume, and identical images on 1 vs 2 processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from idgen.models import NullTextUNet, build_tiny_sd
from idgen.sample import sample
from idgen.sampling import (
    HASH_KEY,
    PARAMS_KEY,
    PromptGrid,
    SamplerSettings,
    image_seed,
    read_prompts,
)
from tests.conftest import compose_config, run_python


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory) -> Path:
    sd = build_tiny_sd(seed=0)
    ids = sd.tokenizer(["a photo of a shape"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        features = sd.text_encoder(ids)[0]
    out = tmp_path_factory.mktemp("domain") / "domain_model"
    NullTextUNet.from_unet(sd.unet, features, init="value").save_pretrained(out)
    return out


def _overrides(domain_dir: Path, extra: list[str] | None = None) -> list[str]:
    return [
        f"domain_model={domain_dir}",
        "prompts=[a photo of a red circle,a photo of a blue square]",
        "images_per_prompt=2",
        "batch_size=2",
        "sampler.num_inference_steps=2",
        *(extra or []),
    ]


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_prompt_grid_and_prompt_file(tmp_path):
    grid = PromptGrid(["a", "b"], images_per_prompt=3, seed=10, is_done=lambda i: i == 4)
    assert len(grid) == 6
    item = grid[4]
    assert (item["prompt"], item["prompt_index"], item["image_index"]) == ("b", 1, 1)
    assert item["seed"] == image_seed(10, 4) == 14 and item["done"]
    f = tmp_path / "p.txt"
    f.write_text("# header\nfirst prompt\n\n  second prompt  \n")
    # the file replaces the list (the config's demo prompts must not leak in)
    assert read_prompts(["zero"], str(f)) == ["first prompt", "second prompt"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts([], str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts([], None)


def test_sampler_required_fields_named(tmp_path):
    cfg = compose_config("sample", tmp_path, ["sampler=controlnet"])
    settings: SamplerSettings = instantiate(cfg.sampler)
    with pytest.raises(ValueError, match=r"sampler\.controlnet="):
        settings.check_required()
    cfg = compose_config("sample", tmp_path, ["sampler=rectify"])
    with pytest.raises(ValueError, match=r"sampler\.extra_guidance\.0\.model"):
        instantiate(cfg.sampler).check_required()


def test_sample_writes_pngs_index_grids_and_resumes(tmp_path, domain_dir):
    cfg = compose_config("sample", tmp_path, _overrides(domain_dir))
    summary = sample(cfg)
    run = Path(cfg.paths.output_dir)
    images = run / "samples"
    assert summary["num_images"] == summary["total"] == 4
    first = _pixels(images)
    assert len(first) == 4 and all(a.shape == (64, 64, 3) for a in first.values())

    # 1. parameters in the PNG text chunks and in samples.jsonl, in index order
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(4))
    with Image.open(run / records[3]["file"]) as im:
        meta = json.loads(im.text[PARAMS_KEY])
        assert im.text["prompt"] == "a photo of a blue square" and im.text["seed"] == "3"
    assert meta == records[3]
    assert meta["model_ids"]["domain"] == str(domain_dir)
    assert meta["sampler"]["num_inference_steps"] == 2 and meta["sampler"]["scheduler"] == "dpm++"
    assert set(meta["guidance_weights"]) == {"domain", "control"}  # auto weights, recorded
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == [
        "p0000_a-photo-of-a-red-circle.png",
        "p0001_a-photo-of-a-blue-square.png",
    ]

    # 2. simulate a killed run: two images gone, a stray temp file left behind
    finished = sorted(images.glob("*.png"))
    old = 1_000_000_000
    for p in finished:
        os.utime(p, (old, old))
    lost = [finished[1], finished[2]]
    for p in lost:
        p.unlink()
    stray = images / ".p0000_000001.png.abc123.tmp"
    stray.write_bytes(b"half a png")
    sample(cfg)
    assert not stray.exists()
    for p in finished:
        if p in lost:
            assert p.stat().st_mtime > old  # redone ...
        else:
            assert p.stat().st_mtime == old  # ... and nothing finished was rewritten
    # the redone images equal the originals bit for bit (seed from the global index)
    again = _pixels(images)
    assert again.keys() == first.keys()
    assert all(np.array_equal(again[k], first[k]) for k in first)
    assert len((run / "samples.jsonl").read_text().splitlines()) == 4

    # 3. changed parameters: nothing is skipped as "finished"
    cfg2 = compose_config("sample", tmp_path, _overrides(domain_dir, ["sampler.w_c=0.5"]))
    sample(cfg2)
    with Image.open(finished[0]) as im:
        assert im.text[HASH_KEY] != records[0]["params_hash"]
    assert all(p.stat().st_mtime > old for p in finished)


def _run_cli(tmp_path: Path, run_dir: Path, overrides: list[str]) -> None:
    # One CPU thread per process in both runs: Lightning gives each DDP process
    # cpus // processes threads, and a different thread count rounds floats differently.
    cmd = [
        "-m",
        "idgen.sample",
        *overrides,
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = run_python(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_one_process_and_two_ddp_processes_write_the_same_images(tmp_path, domain_dir):
    _run_cli(tmp_path, tmp_path / "one", _overrides(domain_dir))
    _run_cli(tmp_path, tmp_path / "two", _overrides(domain_dir, ["trainer=ddp_sim"]))
    one, two = _pixels(tmp_path / "one" / "samples"), _pixels(tmp_path / "two" / "samples")
    assert len(one) == 4 and one.keys() == two.keys()
    assert all(np.array_equal(one[k], two[k]) for k in one)
    read = lambda d: [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "one") == read(tmp_path / "two")


def test_controlnet_rectify_and_sdedit_samplers_run(tmp_path, domain_dir):
    """Each sampler config end to end on tiny saved models; its settings land in the PNGs."""
    from diffusers import ControlNetModel

    sd = build_tiny_sd(seed=0)
    ControlNetModel.from_unet(
        sd.unet, conditioning_embedding_out_channels=(8, 8, 16, 16)
    ).save_pretrained(tmp_path / "controlnet")
    community = build_tiny_sd(seed=3)  # a community "pipeline folder": own UNet + text encoder
    community.unet.save_pretrained(tmp_path / "community" / "unet")
    community.text_encoder.save_pretrained(tmp_path / "community" / "text_encoder")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    cases = {
        "controlnet": [
            f"sampler.controlnet={tmp_path / 'controlnet'}",
            f"sampler.control_image={tmp_path / 'in.png'}",
            f"domain_model={domain_dir}",
        ],
        "rectify": [f"sampler.extra_guidance.0.model={tmp_path / 'community'}"],
        "sdedit": [f"sampler.image={tmp_path / 'in.png'}", f"domain_model={domain_dir}"],
    }
    for name, extra in cases.items():
        overrides = [
            f"sampler={name}",
            "prompts=[a photo of a red circle]",
            "images_per_prompt=1",
            "batch_size=1",
            "sampler.num_inference_steps=2",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
        ]
        cfg = compose_config("sample", tmp_path / name, overrides)
        assert sample(cfg)["num_images"] == 1
        (png,) = (Path(cfg.paths.output_dir) / "samples").glob("*.png")
        with Image.open(png) as im:
            meta = json.loads(im.text[PARAMS_KEY])
        assert meta["sampler"]["name"] == name
        expected_terms = {
            "controlnet": {"domain", "control"},
            "rectify": {"community"},
            "sdedit": {"domain", "control"},
        }[name]
        assert set(meta["guidance_weights"]) == expected_terms


def test_domain_interval_reaches_the_sampler(tmp_path, domain_dir):
    """A domain term active nowhere ([0, 0]) samples exactly like w_d = 0 (closed form)."""

    def run(name: str, extra: list[str]) -> dict[str, np.ndarray]:
        fixed = ["sampler.weights=fixed", "sampler.w_c=2.0", "images_per_prompt=1"]
        cfg = compose_config("sample", tmp_path / name, _overrides(domain_dir, fixed + extra))
        sample(cfg)
        return _pixels(Path(cfg.paths.output_dir) / "samples")

    never = run("never", ["sampler.w_d=1.0", "sampler.domain_interval=[0.0,0.0]"])
    without = run("without", ["sampler.w_d=0.0"])
    always = run("always", ["sampler.w_d=1.0"])
    assert never.keys() == without.keys() == always.keys() and len(never) == 2
    for key in never:
        diff = np.abs(never[key].astype(int) - without[key].astype(int)).max()
        assert diff <= 1, key
        assert np.abs(never[key].astype(int) - always[key].astype(int)).max() > 1, key
