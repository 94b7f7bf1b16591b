"""Prompts: a prompt file replaces the list; previews are the domain's prompt + control prompts;
grid files are named by their prompt."""

from __future__ import annotations

from omegaconf import OmegaConf

from idgen.sampling.settings import read_prompts
from idgen.sampling.writer import grid_name
from tests.conftest import compose_config


def test_prompt_file_replaces_the_list(tmp_path):
    f = tmp_path / "faces.txt"
    f.write_text("a photo of a face\n# a comment\n\na smiling face\n")
    demo = ["a photo of a red circle", "a photo of a blue square"]
    assert read_prompts(demo, str(f)) == ["a photo of a face", "a smiling face"]
    assert read_prompts(demo, None) == demo


def test_sample_config_prompt_file_replaces_demo_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a photo of a cat\n")
    cfg = compose_config("sample", tmp_path, [f"prompt_file={f}"])
    assert read_prompts(cfg.prompts, cfg.prompt_file) == ["a photo of a cat"]


def test_previews_use_the_domain_prompt_and_settable_control_prompts(tmp_path):
    cfg = compose_config("train", tmp_path, ["domain=porcelain"])
    prompts = list(cfg.preview.prompts)
    assert prompts[0] == "a photo of porcelain"
    assert len(prompts) >= 3 and all("circle" not in p and "square" not in p for p in prompts)
    # the validation grids of fine-tuning sample the same prompts
    assert list(cfg.callbacks.decoupled_sampling.val_prompts) == prompts

    mine = compose_config(
        "train",
        tmp_path,
        ["domain=face", "preview.control_prompts=[a smiling ${domain},a red car]"],
    )
    assert OmegaConf.to_container(mine.preview.prompts, resolve=True) == [
        "a photo of face",
        "a smiling face",
        "a red car",
    ]


def test_grid_names_carry_the_prompt():
    assert grid_name(2, "A photo of a face, smiling!") == "p0002_a-photo-of-a-face-smiling.png"
    assert grid_name(0, "") == "p0000_empty.png"
    long = grid_name(1, "word " * 40)
    assert long.startswith("p0001_word-word") and len(long) <= len("p0001_") + 60 + len(".png")
    assert not long.removesuffix(".png").endswith("-")
