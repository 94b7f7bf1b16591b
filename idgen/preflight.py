"""Preflight: each CLI's config checked before any model is loaded or data scanned.

``idgen-train``, ``idgen-sample`` and ``idgen-eval`` call their ``validate_*`` first. A user
mistake raises :class:`~idgen.utils.validation.ConfigError`, whose message names the field (or
file), the value and what to do; the task wrapper turns it into that one line on stderr and exit
code 2. The checks read only small files (config JSONs, folder listings), so they cost
milliseconds (``tests/test_bad_inputs.py``). The field checks they are built from
(``check_int``, ``check_dir``...) live in ``idgen.utils.validation``; this module knows what
each CLI's fields mean (the base model's geometry, a domain model folder, sampler settings).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf

from idgen.models.tiny_presets import tiny_geometry
from idgen.utils.validation import (
    ConfigError,
    check_choice,
    check_dir,
    check_file,
    check_float,
    check_int,
    get,
)

log = logging.getLogger(__name__)

#: idgen-train's stages (``stage=...``)
STAGES = ("inversion", "finetune", "all", "data")
#: what a non-finite training loss does (``nonfinite_loss=...``)
NONFINITE_POLICIES = ("stop", "skip")


# ------------------------------------------------------------------------ the base model's shape


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).exists() or source.count("/") != 1


def base_geometry(model: DictConfig | dict | None) -> dict[str, Any]:
    """What the configured base model looks like, read from config files without loading weights.

    Keys (each may be missing when unknown, e.g. a hub id not yet downloaded): ``vae_factor``,
    ``in_channels``, ``sample_size`` (latent), ``cross_attention_dim``, ``name``.
    """
    if model is None:
        return {}
    model = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else model
    tiny = tiny_geometry(model)
    if tiny is not None:
        return tiny
    source = model.get("pretrained")
    if not source:
        return {}
    source = os.path.expanduser(str(source))
    geometry: dict[str, Any] = {
        "name": str(model.get("pretrained")),
        "family": str(model.get("family") or "sd15"),
    }
    if not _looks_local(source):
        geometry["vae_factor"] = 8  # a hub id: the SD1.5 family's VAE
        return geometry
    vae = _read_json(Path(source) / "vae" / "config.json")
    if vae and vae.get("block_out_channels"):
        geometry["vae_factor"] = 2 ** (len(vae["block_out_channels"]) - 1)
    unet = _read_json(Path(source) / "unet" / "config.json")
    unet = unet or _read_json(Path(source) / "transformer" / "config.json")  # SD3: an MMDiT
    index = _read_json(Path(source) / "model_index.json") or {}
    if "text_encoder_3" in index:  # an optional encoder (SD3's T5): is it in the folder?
        geometry["text_encoder_3"] = bool((index["text_encoder_3"] or [None])[0])
    if unet:
        for key in ("in_channels", "sample_size", "cross_attention_dim"):
            if unet.get(key) is not None:
                geometry[key] = unet[key]
    return geometry


def check_base_model(cfg: DictConfig, key: str = "model") -> dict[str, Any]:
    """A local base-model folder has every SD part; returns its :func:`base_geometry`."""
    model = cfg.get(key)
    if model is None:
        raise ConfigError(key, None, "no base model configured", "Pass model=tiny or model=sd15.")
    pretrained = get(cfg, f"{key}.pretrained") if "pretrained" in model else None
    from idgen.models.single_file import check_single_file_config, is_single_file

    if pretrained and is_single_file(pretrained):  # a community .safetensors (+ model.config)
        family = str(model.get("family") or "sd15")
        geometry = check_single_file_config(
            f"{key}.pretrained", pretrained, model.get("config"), family
        )
        check_family_features(cfg, family)
        return geometry
    if pretrained and _looks_local(os.path.expanduser(str(pretrained))):
        # A folder of another family (model_index.json) is named before anything else.
        from idgen.models.family import check_folder_family, family_named
        from idgen.models.loading import missing_parts

        family = family_named(str(model.get("family") or "sd15"))
        check_folder_family(os.path.expanduser(str(pretrained)), family)
        missing = missing_parts(os.path.expanduser(str(pretrained)), family.components)
        if missing:
            raise ConfigError(
                f"{key}.pretrained",
                str(pretrained),
                f"is not a Stable Diffusion folder in diffusers layout (missing {', '.join(missing)})",
                "Pass the folder that holds model_index.json, unet/, vae/, text_encoder/, "
                "tokenizer/ and scheduler/.",
            )
    geometry = base_geometry(model)
    check_family_features(cfg, str(geometry.get("family") or "sd15"))
    return geometry


def check_family_features(cfg: DictConfig, family_name: str) -> None:
    """What the config asks of the base beyond training and decoupled sampling (Table-1
    baselines, ControlNet, idgen-3d's score distillation) is implemented for its family.

    The families (diffusers classes) are imported only when the config asks for one of these,
    so the other checks' errors come without a diffusers import.
    """
    wanted = []  # (feature, key, value) the family must implement
    module = str(get(cfg, "module._target_") or "")
    if module.endswith("BaselineModule"):
        method = str(get(cfg, "module.method._target_") or "")
        if method:  # the method class says which feature it needs (methods import diffusers)
            from hydra.utils import get_class

            try:
                feature = getattr(get_class(method), "feature", "baselines")
            except (ImportError, ValueError):
                feature = "baselines"  # an unknown class: instantiating it names it
            wanted.append((feature, "module.method", method.rsplit(".", 1)[-1]))
    if get(cfg, "baseline_model") and get(cfg, "sampler.baseline_mode") == "rectify":
        wanted.append(("baseline_rectify", "sampler.baseline_mode", "rectify"))
    for key, feature in (
        ("baseline_model", "baseline_sampling"),
        ("sampler.controlnet", "controlnet"),
        ("callbacks.decoupled_sampling.settings.controlnet", "controlnet"),
    ):
        value = get(cfg, key)
        if value:
            wanted.append((feature, key, value))
    if cfg.get("sds") is not None:
        wanted.append(("sds", "model", family_name))
    if wanted:
        from idgen.models.family import family_named

        family = family_named(family_name)
        for feature, key, value in wanted:
            family.require(feature, key, value)
            if feature == "controlnet":
                check_controlnet_family(key, value, family)


def check_controlnet_family(key: str, value: Any, family: Any) -> None:
    """Each ControlNet folder (its ``config.json``) is of the base's family (an SD1.5 ControlNet
    cannot steer an SDXL UNet, nor the reverse)."""
    from idgen.models.family import FamilyError, family_of

    for path in value if isinstance(value, list | tuple) else [value]:
        config = _read_json(Path(os.path.expanduser(str(path))) / "config.json")
        if not config:
            continue  # a missing folder is named by the sampler's own check
        try:
            theirs = family_of(config).name
        except FamilyError:
            continue
        if theirs != family.name:
            raise ConfigError(
                key,
                str(path),
                f"is a ControlNet of a {theirs} model, but the base is {family.name}",
                f"Use a ControlNet trained for {family.name} (or model=... of its family).",
            )


def check_resolution(
    cfg: DictConfig, key: str, geometry: dict[str, Any], optional: bool = False
) -> int | None:
    """Pixels: a positive multiple of the VAE's downsampling factor (8 for SD1.5)."""
    factor = int(geometry.get("vae_factor") or 8)
    return check_int(
        cfg,
        key,
        minimum=factor,
        optional=optional,
        multiple_of=factor,
        why=f" (the base model's VAE works on {factor}x{factor}-pixel cells)",
    )


# ------------------------------------------------------------------------------- idgen-train


def check_seed(cfg: DictConfig) -> None:
    """``seed``: a non-negative integer (every CLI's)."""
    check_int(cfg, "seed", minimum=0)


def check_train_run(cfg: DictConfig) -> str:
    """The run's top-level choices: ``stage``, ``seed`` and ``nonfinite_loss``; returns the stage."""
    stage = check_choice(cfg, "stage", STAGES)
    check_seed(cfg)
    check_choice(cfg, "nonfinite_loss", NONFINITE_POLICIES)
    return stage


def check_train_data(cfg: DictConfig, geometry: dict[str, Any]) -> None:
    """The ``data`` section's numbers (the resolution fits the base model's VAE), then its root."""
    if cfg.get("data") is None:
        raise ConfigError("data", None, "no data configured", "Pass data=folder data.root=<dir>.")
    check_resolution(cfg, "data.resolution", geometry)
    check_int(cfg, "data.batch_size")
    check_int(cfg, "data.num_workers", minimum=0, optional=True)  # null: computed
    check_int(cfg, "data.max_images", optional=True)
    if "num_images" in cfg.data:
        check_int(cfg, "data.num_images")
    if "val_fraction" in cfg.data:
        check_float(
            cfg, "data.val_fraction", optional=False, minimum=0.0, maximum=1.0, open_max=True
        )
    check_data_root(cfg)


def check_data_root(cfg: DictConfig) -> None:
    """``data.root``: a folder of images, or (generated data, ``data.num_images`` set) not a file.

    Generated (demo/toy-world) data is made on first use, so its root may not exist yet; a data
    config without ``_target_`` names no dataset and its root is not checked.
    """
    root = get(cfg, "data.root")
    target = str(get(cfg, "data._target_") or "")
    generated = "num_images" in cfg.data  # demo/toy-world data: made on first use
    if generated:
        if root and Path(os.path.expanduser(str(root))).is_file():
            raise ConfigError(
                "data.root", str(root), "is a file, not a folder", "Pass a folder (or leave it)."
            )
    elif target:
        from idgen.data.images import DEFAULT_EXTENSIONS

        extensions = get(cfg, "data.extensions") or DEFAULT_EXTENSIONS
        check_dir("data.root", root, "the domain's images", extensions=extensions)


def check_preview(cfg: DictConfig, geometry: dict[str, Any]) -> None:
    """The base-model preview grid's settings, when ``preview.enabled``."""
    if cfg.get("preview") is not None and get(cfg, "preview.enabled"):
        check_int(cfg, "preview.num_inference_steps")
        check_resolution(cfg, "preview.resolution", geometry)
        check_float(cfg, "preview.guidance_scale", optional=False)


def check_inversion(cfg: DictConfig) -> None:
    """Stage 1 (textual inversion): its step counts and learning rate."""
    check_int(cfg, "inversion_steps")
    check_int(cfg, "inversion_max_images", optional=True)
    check_float(cfg, "inversion.optimizer.lr", optional=False, positive=True)


def check_objective_options(cfg: DictConfig, key: str, family_name: str) -> None:
    """A stage's (``key``: ``inversion`` or ``module``) loss options fit the base family's
    training objective: ``snr_gamma`` (min-SNR) needs the denoising objective's noise schedule,
    ``flow_matching.*`` the flow-matching one (SD3); the other objective's option is an error,
    never ignored. The families are imported only when one of them is set."""
    snr_gamma = get(cfg, f"{key}.snr_gamma", None)
    block = get(cfg, f"{key}.flow_matching", None) or {}
    flow_set = {k: v for k, v in dict(block).items() if v is not None}
    if snr_gamma is None and not flow_set:
        return
    from idgen.models.family import family_named
    from idgen.modules.flow_matching import LOSS_WEIGHTINGS, OPTIONS, TIMESTEP_SCHEMES

    if family_named(family_name).training_objective == "flow_matching":
        if snr_gamma is not None:
            raise ConfigError(
                f"{key}.snr_gamma",
                snr_gamma,
                f"min-SNR weighting needs the denoising objective; model family {family_name} "
                "is trained by flow matching",
                f"Drop it ({key}.snr_gamma=null); weight the loss with "
                f"{key}.flow_matching.loss_weighting=sigma_sqrt|cosmap instead.",
            )
        unknown = sorted(set(flow_set) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"{key}.flow_matching.{unknown[0]}",
                flow_set[unknown[0]],
                "is not a flow-matching option",
                f"Use {', '.join(OPTIONS)}.",
            )
        for option, choices in (
            ("weighting_scheme", TIMESTEP_SCHEMES),
            ("loss_weighting", LOSS_WEIGHTINGS),
        ):
            if option in flow_set:
                check_choice(cfg, f"{key}.flow_matching.{option}", choices)
        for option in ("logit_mean", "logit_std", "mode_scale"):
            check_float(cfg, f"{key}.flow_matching.{option}", positive=option == "logit_std")
        return
    option, value = next(iter(flow_set.items()))
    raise ConfigError(
        f"{key}.flow_matching.{option}",
        value,
        f"applies to flow-matching bases (sd3) only; model family {family_name} is trained by "
        "denoising",
        f"Drop it ({key}.flow_matching.{option}=null); {key}.snr_gamma sets min-SNR weighting.",
    )


def check_finetune(cfg: DictConfig, stage: str) -> None:
    """Stage 2 (fine-tuning): optimizer steps and rate, callbacks, and the files it starts from."""
    check_finetune_optimizer(cfg)
    check_sampling_callbacks(cfg)
    check_finetune_inputs(cfg, stage)
    check_checkpoint_callback(cfg)


def check_finetune_optimizer(cfg: DictConfig) -> None:
    """``trainer.max_steps`` (``-1`` allowed when ``trainer.max_epochs`` bounds the run) and
    ``module.optimizer.lr``."""
    check_int(
        cfg,
        "trainer.max_steps",
        extra=(-1,) if (get(cfg, "trainer.max_epochs") or -1) > 0 else (),
        why=" (the number of optimizer steps of stage 2)",
    )
    check_float(cfg, "module.optimizer.lr", optional=False, positive=True)


def check_sampling_callbacks(cfg: DictConfig) -> None:
    """The decoupled-sampling callback's interval and the EMA callback's decay, when configured."""
    if "decoupled_sampling" in (cfg.get("callbacks") or {}):
        check_int(cfg, "callbacks.decoupled_sampling.every_n_train_steps", optional=True)
    ema = (cfg.get("callbacks") or {}).get("ema")
    if isinstance(ema, DictConfig) and "decay" in ema:  # ~callbacks.ema / null: no EMA
        check_float(
            cfg, "callbacks.ema.decay", optional=False, minimum=0.0, maximum=1.0, open_max=True
        )


def check_finetune_inputs(cfg: DictConfig, stage: str) -> None:
    """The files stage 2 starts from: stage 1's ``text_features`` (when only stage 2 runs) and a
    ``ckpt_path`` to resume (``last``: the newest, when there is one)."""
    text_features = get(cfg, "text_features")
    if stage == "finetune" and text_features:
        path = Path(os.path.expanduser(str(text_features)))
        if path.is_dir():
            path = path / "text_features.safetensors"
        check_file("text_features", str(path), "a stage-1 text_features.safetensors")
    ckpt = get(cfg, "ckpt_path")
    # a folder is a sharded checkpoint (trainer=fsdp, trainer=deepspeed)
    if ckpt not in (None, "last") and not Path(os.path.expanduser(str(ckpt))).is_dir():
        check_file("ckpt_path", ckpt, "a training checkpoint (.ckpt), or pass ckpt_path=last")


def features_metadata(path: Path) -> dict[str, str]:
    """The metadata stage 1 wrote into a ``text_features.safetensors`` (its header only, no
    torch; empty when unreadable: loading the file names that problem later)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError):
        return {}


def check_features_base(cfg: DictConfig, geometry: dict[str, Any]) -> None:
    """Stage 2's ``text_features`` (``stage=finetune``) were inverted on a base like this one:
    the same family and, for SD3, the same T5 setting. The domain model records its stage-2
    base, and sampling refuses a base without the T5 a domain model was made with, so features
    of another T5 setting would pass that check with the wrong record."""
    value = get(cfg, "text_features")
    if not value:
        return
    path = Path(os.path.expanduser(str(value)))
    meta = features_metadata(path / "text_features.safetensors" if path.is_dir() else path)
    mismatches = []
    ours, theirs = meta.get("family"), geometry.get("family")
    if ours and theirs and ours != theirs:
        mismatches.append(f"model family {ours} (base model: {theirs})")
    t5, base_t5 = meta.get("text_encoder_3"), geometry.get("text_encoder_3")
    if t5 in ("true", "false") and base_t5 is not None and (t5 == "true") != base_t5:
        mismatches.append(
            "made on an SD3 base with T5 (text_encoder_3), the base has no T5"
            if t5 == "true"
            else "made on an SD3 base without T5 (text_encoder_3), the base has T5"
        )
    if mismatches:
        raise ConfigError(
            "text_features",
            str(value),
            "were inverted on another base: " + "; ".join(mismatches),
            "Run stage 2 on the base stage 1 used (model.t5=true/false, or a folder with or "
            "without text_encoder_3), or redo stage 1 on this base (stage=all).",
        )


def check_checkpoint_callback(cfg: DictConfig) -> None:
    """The model-checkpoint callback's interval and ``save_top_k``, when configured."""
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if checkpoint is not None:
        check_int(cfg, "callbacks.model_checkpoint.every_n_train_steps", optional=True)
        check_int(cfg, "callbacks.model_checkpoint.save_top_k", minimum=-1)


def check_trainer(cfg: DictConfig) -> None:
    """The trainer's gradient accumulation and logging interval (every stage), and its device."""
    check_int(cfg, "trainer.accumulate_grad_batches")
    check_int(cfg, "trainer.log_every_n_steps")
    check_strategy(cfg)
    check_accelerator(cfg)


#: strategies that shard the model over processes (``trainer=fsdp``, ``trainer=deepspeed``)
SHARDED_STRATEGIES = ("fsdp", "deepspeed")


def check_strategy(cfg: DictConfig) -> None:
    """``trainer.strategy``: a Lightning strategy name or an importable ``_target_``; a sharded
    one (FSDP, DeepSpeed) with its package, over >= 2 devices in all, and without the EMA."""
    strategy = get(cfg, "trainer.strategy") if cfg.get("trainer") is not None else None
    if strategy is None:
        return
    if isinstance(strategy, dict):
        name = str(strategy.get("_target_", ""))
        try:
            from hydra.utils import get_class

            get_class(name)
        except Exception:
            if "deepspeed" in name.lower():
                check_deepspeed_installed()
            raise ConfigError(
                "trainer.strategy._target_",
                name,
                "is not an importable strategy class",
                "Pick one of idgen/conf/trainer/ (trainer=ddp, fsdp, deepspeed).",
            ) from None
    else:
        from lightning.pytorch.strategies import StrategyRegistry

        name = str(strategy)
        known = ["auto", *StrategyRegistry.available_strategies()]
        if name not in known:
            raise ConfigError(
                "trainer.strategy",
                name,
                "is not a Lightning strategy",
                f"Use trainer=ddp|fsdp|deepspeed, or one of: {', '.join(known)}.",
            )
    kind = next((k for k in SHARDED_STRATEGIES if k in name.lower()), None)
    if kind is None:
        return
    if kind == "deepspeed":
        check_deepspeed_installed()
    devices, nodes = get(cfg, "trainer.devices"), get(cfg, "trainer.num_nodes") or 1
    count = len(devices) if isinstance(devices, list) else devices
    if isinstance(count, int) and count > 0 and isinstance(nodes, int) and count * nodes < 2:
        raise ConfigError(
            "trainer.devices",
            devices,
            f"{kind} shards the model over processes, and trainer.devices x trainer.num_nodes "
            f"is {count * nodes}",
            "Use trainer=gpu for one GPU, or trainer.devices>=2 (or trainer.num_nodes>=2).",
        )
    if isinstance((cfg.get("callbacks") or {}).get("ema"), DictConfig):
        raise ConfigError(
            "callbacks.ema",
            "EMAWeights",
            f"keeps a per-process copy of the weights, which under {kind} would be one shard "
            "of them",
            "Pass ~callbacks.ema (or trainer=ddp, which keeps whole weights on every GPU).",
        )


def check_deepspeed_installed() -> None:
    """``trainer=deepspeed`` needs the optional ``deepspeed`` package."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "trainer",
            "deepspeed",
            "needs the deepspeed package, which is not installed",
            "pip install 'idgen[deepspeed]', or use trainer=fsdp.",
        )


#: Lightning accelerators that need a CUDA device
CUDA_ACCELERATORS = ("gpu", "cuda")


def check_accelerator(cfg: DictConfig, key: str = "trainer.accelerator") -> None:
    """``trainer=gpu`` needs a CUDA device this process can see (and ``trainer.devices`` of them).

    Said before the data scan and the base-model preview, not by Lightning after them.
    """
    accelerator = get(cfg, key) if cfg.get("trainer") is not None else None
    if str(accelerator).lower() not in CUDA_ACCELERATORS:
        return
    check_cuda(key, accelerator, "Use trainer=cpu")
    devices = get(cfg, "trainer.devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        import torch

        if devices > torch.cuda.device_count():
            raise ConfigError(
                "trainer.devices",
                devices,
                f"this process sees {torch.cuda.device_count()} CUDA device(s)",
                f"Pass trainer.devices={torch.cuda.device_count()} (or -1 for all of them).",
            )


def check_cuda(key: str, value: Any, alternative: str) -> None:
    """``key=value`` asks for CUDA: a clear error when this process sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            key,
            value,
            "no CUDA GPU is visible to this process (torch.cuda.is_available() is False)",
            f"{alternative}, or run on a machine with a GPU (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES).",
        )


#: train.yaml's default ``domain``: what the generated demo data shows, not a user's folder
DEMO_DOMAIN = "coloured shapes"


def check_domain_named(cfg: DictConfig) -> None:
    """A folder of the user's own images needs ``domain=``: the words of the stage-1 prompt
    ("a photo of {domain}") and of the preview and validation prompts.

    Generated data (demo, toy world: ``data.num_images``) comes with its domain; a real folder
    left at the demo's default would be trained as "a photo of coloured shapes".
    """
    target = str(get(cfg, "data._target_") or "")
    if not target or "num_images" in cfg.data:
        return
    domain = get(cfg, "domain")
    if domain in (None, "", DEMO_DOMAIN):
        prompt = str(get(cfg, "inversion.prompt_template") or "a photo of {domain}")
        raise ConfigError(
            "domain",
            domain,
            "names what the images of data.root show, and is still the demo's default (the "
            f"stage-1 prompt would be '{prompt.format(domain=domain)}')",
            "Pass what your images show, e.g. domain=face or domain='porcelain vase'.",
        )


def check_logger(cfg: DictConfig) -> None:
    """``logger``: a logger config group (``logger=csv``...) or null, not a bare value."""
    logger = cfg.get("logger")
    if logger is not None and not isinstance(logger, DictConfig):
        raise ConfigError(
            "logger", logger, "must be a logger config group", "Pass logger=csv or logger=null."
        )


def validate_train(cfg: DictConfig) -> None:
    """Every user-set value idgen-train needs, checked before data is scanned or models built."""
    if cfg.get("plan"):
        return  # plan=...: idgen.train plans first, needing neither the data nor the device
    stage = check_train_run(cfg)
    geometry = check_base_model(cfg)
    check_train_data(cfg, geometry)
    check_domain_named(cfg)
    check_preview(cfg, geometry)
    if stage in ("inversion", "all"):
        check_inversion(cfg)
    if stage in ("finetune", "all"):
        check_finetune(cfg, stage)
    if stage == "finetune":
        check_features_base(cfg, geometry)
    stage_keys = {"inversion": ("inversion",), "finetune": ("module",)}
    for key in stage_keys.get(stage, ("inversion", "module") if stage == "all" else ()):
        check_objective_options(cfg, key, str(geometry.get("family") or "sd15"))
    check_trainer(cfg)
    check_logger(cfg)


# -------------------------------------------------------------------------------- idgen-eval

DEVICES = ("auto", "cpu", "cuda", "mps")


def check_eval_run(cfg: DictConfig) -> None:
    """idgen-eval's ``batch_size``, ``resolution`` (optional), ``seed`` and ``device``."""
    check_int(cfg, "batch_size")
    check_int(cfg, "resolution", optional=True)
    check_seed(cfg)
    check_device(cfg)


def check_device(cfg: DictConfig) -> None:
    """``device``: ``auto``, ``cpu``, ``cuda``, ``mps`` or ``cuda:<index>``."""
    device = get(cfg, "device")
    if not isinstance(device, str) or not (
        device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ConfigError("device", device, "is not a device", "Pass device=auto, cpu or cuda:0.")
    if device.startswith("cuda"):
        check_cuda("device", device, "Pass device=cpu (or device=auto)")


def check_sample_first(cfg: DictConfig) -> None:
    """The ``sample`` section (sample, then evaluate): its module is installed, its guidance
    weights are numbers and its ``images_subdir`` is a folder name."""
    import importlib.util

    module = get(cfg, "sample.module") or "idgen.sample"
    try:
        found = importlib.util.find_spec(str(module)) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            "sample.module",
            module,
            f"sample-then-evaluate runs `python -m {module}`, which is not installed",
            "Run idgen-sample yourself and pass samples_dir=<its image folder> (and sample=null).",
        )
    for key in ("w_d", "w_c"):
        check_weight(cfg, f"sample.{key}")
    subdir = get(cfg, "sample.images_subdir")
    if not subdir or not isinstance(subdir, str):
        raise ConfigError(
            "sample.images_subdir", subdir, "must be a folder name", "Pass e.g. samples."
        )
    if str(module) == "idgen.sample":
        check_hook_sampling(cfg)


def check_hook_sampling(cfg: DictConfig) -> None:
    """idgen-sample's own preflight on the config the ``sample`` hook will run, before sampling.

    Its errors name the hook's fields (``sample.domain_model``, ``sample.w_d``...) where the hook
    has one, and otherwise the override in ``sample.overrides``.
    """
    import re

    from idgen.metrics.sample_hook import FIELDS, compose_sample_config, sample_overrides

    overrides = sample_overrides(cfg.sample)
    try:
        run_dir = Path(str(get(cfg, "paths.output_dir"))) / "sampling"
        validate_sample(compose_sample_config(overrides, run_dir))
    except ConfigError as err:
        hook = {key: f"sample.{field}" for field, key in FIELDS.items()}

        def rename(text: str) -> str:  # idgen-sample's key=... -> the hook's field=...
            return re.sub(r"(?<![\w.])([\w.]+)=", lambda m: f"{hook.get(m[1], m[1])}=", text)

        field = hook.get(err.field, f"sample.overrides ({err.field})")
        problem = f"{err.problem} (in the idgen-sample run of `sample`)"
        raise ConfigError(field, err.value, problem, rename(err.fix)) from None
    except Exception as err:  # an override idgen-sample's config does not have
        raise ConfigError(
            "sample.overrides",
            overrides,
            f"do not compose as idgen-sample's config ({type(err).__name__}: {err})",
            "Fix or drop the override (keys as in idgen-sample's sample.yaml).",
        ) from None


def check_fid_extractor(cfg: DictConfig) -> None:
    """The FID/KID extractor's weights: a given ``metrics.fid.extractor.weights_path`` exists,
    and without one Inception-v3 is cached or downloadable (said before any sampling)."""
    target = str(get(cfg, "metrics.fid.extractor._target_") or "")
    if not target.endswith("InceptionFeatures"):
        return
    from idgen.metrics.features import (
        WEIGHTS_KEY,
        how_to_get_inception,
        inception_weights_unavailable,
    )

    weights = get(cfg, WEIGHTS_KEY)
    problem = inception_weights_unavailable(weights)
    if problem is not None:
        raise ConfigError(WEIGHTS_KEY, weights, problem, how_to_get_inception())


def check_samples_dir(cfg: DictConfig) -> None:
    """``samples_dir`` (no ``sample`` section): a folder holding generated images."""
    samples = get(cfg, "samples_dir")
    if samples is None:
        raise ConfigError(
            "samples_dir",
            None,
            "is not set",
            "Pass samples_dir=<folder of generated images> (or configure sample=... to "
            "sample first).",
        )
    from idgen.data.images import DEFAULT_EXTENSIONS

    check_dir(
        "samples_dir",
        samples,
        "generated images",
        extensions=DEFAULT_EXTENSIONS,
        noun="samples folder",
    )


def check_reference_dir(cfg: DictConfig) -> None:
    """``reference_dir``: a folder of domain images, required when ``metrics.fid`` is set."""
    metrics = cfg.get("metrics")
    needs_reference = metrics is not None and metrics.get("fid") is not None
    reference = get(cfg, "reference_dir")
    if reference is not None or needs_reference:
        if reference is None:
            raise ConfigError(
                "reference_dir",
                None,
                "is required by FID/KID (metrics.fid is set)",
                "Pass reference_dir=<folder of domain images>.",
            )
        from idgen.data.images import DEFAULT_EXTENSIONS

        check_dir("reference_dir", reference, "domain images", extensions=DEFAULT_EXTENSIONS)


def validate_eval(cfg: DictConfig) -> None:
    """idgen-eval's folders and numbers, checked before any image or feature extractor is read."""
    check_eval_run(cfg)
    if cfg.get("sample") is not None:
        check_sample_first(cfg)
    else:
        check_samples_dir(cfg)
    check_reference_dir(cfg)
    check_fid_extractor(cfg)


# ------------------------------------------------------------------------------ idgen-sample

DOMAIN_CONFIG = "config.json"


def check_scheduler(key: str, name: Any) -> None:
    """``dpm++`` or a diffusers scheduler class name (checked by name, nothing instantiated)."""
    if name in ("dpm++", "dpmsolver++"):
        return
    import diffusers

    cls = getattr(diffusers, str(name), None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_config") or not str(name).endswith("Scheduler"):
        raise ConfigError(
            key,
            name,
            "is not a scheduler",
            "Use dpm++ or a diffusers scheduler class name such as DDIMScheduler or "
            "EulerDiscreteScheduler.",
        )


def check_interval(cfg: DictConfig, key: str) -> None:
    value = get(cfg, key)
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0.0 <= value[0] <= value[1] <= 1.0
    )
    if not ok:
        raise ConfigError(
            key, value, "must be [start, end] with 0 <= start <= end <= 1", f"Pass {key}=[0,1]."
        )


def check_domain_model(key: str, folder: Any, base: dict[str, Any]) -> dict[str, Any]:
    """An exported NullTextUNet folder that fits the base model it will be mixed with.

    Checks (from ``config.json`` and ``idgen_domain.json``, no weights read): the folder exists
    and holds weights, it is a ``NullTextUNet`` export (not a plain UNet, not empty), and its
    latent channels, latent sample size and cross-attention width equal the base's; a recorded
    base model that differs from the configured one is an error too. Returns the UNet config.
    """
    path = check_dir(key, folder, "an exported domain model (idgen-train's domain_model/)", None)
    config = read_domain_export(key, folder, path)
    # the denoiser's config (SD3's null-text transformer keeps it as transformer_config)
    unet = dict(config.get("unet_config") or config.get("transformer_config") or {})
    mismatches = base_mismatches(unet, path, base)
    if mismatches:
        raise ConfigError(
            key,
            str(folder),
            "was trained for another base model: " + "; ".join(mismatches),
            "Sample with the base it was trained on (model=...), or train a domain model on "
            "this base.",
        )
    return unet


def read_domain_export(key: str, folder: Any, path: Path) -> dict[str, Any]:
    """The ``config.json`` of the domain model folder ``path`` (``key=folder``), checked to be a
    readable ``NullTextUNet`` export with weights next to it."""
    config = _read_json(path / DOMAIN_CONFIG)
    if config is None:
        raise ConfigError(
            key,
            str(folder),
            f"has no readable {DOMAIN_CONFIG}",
            "Pass the domain_model/ folder idgen-train exports (or export a checkpoint with "
            "`python -m idgen.modules.export CKPT OUT_DIR`).",
        )
    from idgen.models.domain_models import DOMAIN_MODEL_CLASSES

    cls = config.get("_class_name")
    if cls not in DOMAIN_MODEL_CLASSES:
        raise ConfigError(
            key,
            str(folder),
            f"holds a {cls or 'non-idgen'} model, not an idgen NullTextUNet domain model",
            "Pass the domain_model/ folder written by idgen-train (a Table-1 baseline goes to "
            "baseline_model=<folder> instead).",
        )
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise ConfigError(
            key, str(folder), "holds no weights (*.safetensors)", "Re-export the domain model."
        )
    return config


def base_mismatches(unet: dict[str, Any], path: Path, base: dict[str, Any]) -> list[str]:
    """How a domain model (its UNet config ``unet``, its folder ``path``) differs from the base
    geometry ``base``: latent shape and cross-attention width, and the base model recorded in
    ``idgen_domain.json``; empty when it fits (or nothing is known to differ)."""
    mismatches = []
    for field, name in (
        ("in_channels", "latent channels"),
        ("sample_size", "latent sample size"),
        ("cross_attention_dim", "cross-attention width"),
    ):
        ours, theirs = unet.get(field), base.get(field)
        if ours is not None and theirs is not None and ours != theirs:
            mismatches.append(f"{name} {ours} (base model: {theirs})")
    theirs = base.get("family")
    from idgen.models.family import family_of

    ours = family_of(unet).name if unet else None
    if ours and theirs and ours != theirs:
        mismatches.append(f"model family {ours} (base model: {theirs})")
    meta = _read_json(path / "idgen_domain.json") or {}
    if meta.get("text_encoder_3") and base.get("text_encoder_3") is False:
        mismatches.append("trained on an SD3 base with T5 (text_encoder_3), the base has no T5")
    recorded = meta.get("base_model")
    configured = base.get("name")
    if recorded and configured and recorded not in ("unknown",) and recorded != configured:
        same = os.path.realpath(os.path.expanduser(str(recorded))) == os.path.realpath(
            os.path.expanduser(str(configured))
        )
        if not same:
            mismatches.append(f"trained on base '{recorded}' (configured: '{configured}')")
    return mismatches


def check_prompts(cfg: DictConfig) -> None:
    prompts = get(cfg, "prompts") or []
    if not isinstance(prompts, list):
        raise ConfigError("prompts", prompts, "must be a list", "Pass prompts='[a photo of x]'.")
    prompt_file = get(cfg, "prompt_file")
    # "" counts: it is the unconditional prompt (FID samples, prompts='[""]' in the recipes).
    n = len([p for p in prompts if p is not None])
    if prompt_file:
        path = check_file("prompt_file", prompt_file, "a text file with one prompt per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                "prompt_file",
                str(prompt_file),
                f"is not readable text ({err})",
                "Save it as UTF-8.",
            ) from None
        in_file = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
        if not in_file:
            raise ConfigError(
                "prompt_file",
                str(prompt_file),
                "holds no prompts (only blank or # lines)",
                "Write one prompt per line.",
            )
        n += len(in_file)
    if n == 0:
        raise ConfigError(
            "prompts", prompts, "no prompt given", "Pass prompts='[...]' or prompt_file=<file>."
        )


def validate_sample(cfg: DictConfig) -> None:
    """idgen-sample's settings, prompts and model folders, checked before any model is loaded."""
    geometry = check_base_model(cfg)
    check_seed(cfg)
    check_int(cfg, "images_per_prompt")
    check_int(cfg, "batch_size")
    check_resolution(cfg, "resolution", geometry, optional=True)
    check_prompts(cfg)
    sampler = cfg.get("sampler")
    if sampler is None:
        raise ConfigError("sampler", None, "no sampler configured", "Pass sampler=decoupled.")
    name = get(cfg, "sampler.name")
    if not isinstance(name, str) or not name:
        raise ConfigError("sampler.name", name, "must be a name", "Pass sampler=decoupled.")
    for key in ("w_d", "w_c"):
        if key in sampler:
            check_weight(cfg, f"sampler.{key}")
    if "w0" in sampler:
        check_float(cfg, "sampler.w0", optional=False)
    if "strength" in sampler:
        check_float(cfg, "sampler.strength", minimum=0.0, maximum=1.0)
    if "weights" in sampler:
        from idgen.pipelines.in_domain import WeightMode  # (imported here: --help stays fast)

        check_choice(cfg, "sampler.weights", get_args(WeightMode))
    if "baseline_mode" in sampler:
        from idgen.sampling.settings import BASELINE_MODES

        check_choice(cfg, "sampler.baseline_mode", BASELINE_MODES)
    check_int(cfg, "sampler.num_inference_steps")
    check_scheduler("sampler.scheduler", get(cfg, "sampler.scheduler", "dpm++"))
    for key in ("domain_interval", "control_interval"):
        if key in sampler:
            check_interval(cfg, f"sampler.{key}")
    for i, term in enumerate(get(cfg, "sampler.extra_guidance") or []):
        weight = term.get("weight") if isinstance(term, dict) else None
        if weight not in (None, "auto") and (
            not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0
        ):
            raise ConfigError(
                f"sampler.extra_guidance.{i}.weight",
                weight,
                "must be a finite number >= 0 or auto",
                "Pass a finite weight >= 0 (0 turns the term off).",
            )
    check_sampler_adapters(cfg, geometry)
    domain = get(cfg, "domain_model")
    if domain:
        check_domain_model("domain_model", domain, geometry)
    baseline = get(cfg, "baseline_model")
    if baseline:
        check_dir("baseline_model", baseline, "an exported baseline", None)
    check_domain_given(cfg)
    check_accelerator(cfg)


def check_sampler_adapters(cfg: DictConfig, geometry: dict[str, Any]) -> None:
    """LoRAs (``sampler.lora``, ``sampler.extra_guidance.<i>.lora``) fit the base; a single-file
    ``extra_guidance.<i>.model`` is an SD1.5 checkpoint (headers only)."""
    from idgen.models.lora import check_lora_config
    from idgen.models.single_file import is_single_file, single_file_problem

    width = geometry.get("cross_attention_dim")
    family = str(geometry.get("family") or "sd15")
    check_lora_config("sampler.lora", get(cfg, "sampler.lora"), width, family)
    for i, term in enumerate(get(cfg, "sampler.extra_guidance") or []):
        term = term if isinstance(term, dict) else {}
        check_lora_config(f"sampler.extra_guidance.{i}.lora", term.get("lora"), width, family)
        model = term.get("model")
        if model and is_single_file(model) and (why := single_file_problem(model)):
            raise ConfigError(
                f"sampler.extra_guidance.{i}.model", str(model), why, "Pass an SD1.5 .safetensors."
            )


def check_weight(cfg: DictConfig, key: str) -> float | None:
    """A guidance weight: null (automatic, paper §3.4), 0 (the term is off) or a finite number
    > 0. A negative weight would push the samples away from its term's prediction."""
    value = check_float(cfg, key)
    if value is not None and value < 0:
        raise ConfigError(
            key,
            value,
            "is negative (a guidance weight is >= 0: 0 turns its term off, null chooses it "
            "automatically)",
            f"Pass {key}=null (automatic) or a number >= 0.",
        )
    return value


def check_domain_given(cfg: DictConfig) -> None:
    """A sampler with a domain term (``sampler.w_d`` automatic or non-zero) needs
    ``domain_model``: said here, not by the pipeline after the models have loaded."""
    if get(cfg, "domain_model"):
        return
    w_d = get(cfg, "sampler.w_d")
    if w_d is not None and float(w_d) == 0.0:
        return
    name = get(cfg, "sampler.name")
    raise ConfigError(
        "domain_model",
        None,
        f"sampler={name} mixes in a domain model (sampler.w_d="
        f"{'null, automatic' if w_d is None else w_d}) and none is given",
        "Pass domain_model=<the domain_model/ folder idgen-train exported>, or sampler=cfg for "
        "plain classifier-free guidance (or sampler.w_d=0).",
    )


# ---------------------------------------------------------------------------------- idgen-3d


def validate_3d(cfg: DictConfig) -> None:
    """idgen-3d's numbers, guidance weights, device and domain model (it must fit the base
    model, as for idgen-sample), checked before any model is loaded."""
    geometry = check_base_model(cfg)
    check_seed(cfg)
    check_int(cfg, "steps", minimum=0)
    check_int(cfg, "batch_size")
    for key in ("w_d", "w_c"):
        check_weight(cfg, f"sds.{key}")
    device = get(cfg, "device")
    if isinstance(device, str) and device.startswith("cuda"):
        check_cuda("device", device, "Pass device=cpu")
    domain = get(cfg, "domain_model")
    if domain:
        check_domain_model("domain_model", domain, geometry)
