"""Every top-level config and every option of its groups composes and instantiates lazily."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from idgen import CONFIG_DIR
from tests.conftest import compose_config

CONF = Path(CONFIG_DIR)
TOP_LEVEL = sorted(p.stem for p in CONF.glob("*.yaml"))
# Groups that hold objects to instantiate as a whole, or as a mapping name -> object.
DICT_GROUPS = {"logger", "callbacks"}
NOT_OBJECTS = {"paths", "hydra", "debug", "experiment", "hparams_search"}


def group_options(config_name: str) -> list[tuple[str, str]]:
    defaults = OmegaConf.load(CONF / f"{config_name}.yaml").get("defaults", [])
    cases = []
    for entry in defaults:
        if not isinstance(entry, dict | DictConfig):
            continue
        ((group, _),) = entry.items()
        group = group.removeprefix("override ").split("@")[0]
        if not (CONF / group).is_dir() or group == "hydra":
            continue
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            cases.append((group, option))
    return cases


CASES = [(name, None, None) for name in TOP_LEVEL] + [
    (name, group, option) for name in TOP_LEVEL for group, option in group_options(name)
]


def instantiate_lazily(cfg: DictConfig) -> None:
    for key, node in cfg.items():
        if key in NOT_OBJECTS or not isinstance(node, DictConfig):
            continue
        if key == "trainer" and node.get("accelerator") in ("gpu", "cuda"):
            continue  # no GPU here: composing it is what can be checked
        if "_target_" in node:
            obj = instantiate(node)
            assert obj is not None, key
        elif key in DICT_GROUPS:
            for sub in node.values():
                if isinstance(sub, DictConfig) and "_target_" in sub:
                    assert instantiate(sub) is not None


@pytest.mark.parametrize(("config_name", "group", "option"), CASES, ids=lambda v: str(v))
def test_config_composes_and_instantiates(tmp_path, config_name, group, option):
    overrides = [] if group is None else [f"{group}={option}"]
    if group == "data" and option == "folder":
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_config(config_name, tmp_path, overrides)
    # Every interpolation outside Hydra's own node resolves.
    OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    instantiate_lazily(cfg)
    # Composing and instantiating never touched disk: nothing was created under the root.
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()


def test_model_configs_are_lazy_loaders(tmp_path):
    cfg = compose_config("train", tmp_path, ["model=sd15", "model.pretrained=/definitely/not/here"])
    loader = instantiate(cfg.model)
    assert callable(loader)  # building the partial did not try to load the missing folder
