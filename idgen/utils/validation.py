"""Early checks of a composed config: one clear error before any model is loaded or data scanned.

Every entry point (``idgen-train``, ``idgen-sample``, ``idgen-eval``) calls its ``validate_*``
function first. A user mistake raises :class:`ConfigError`, whose message names the field (or
file), the value, and what to do; :func:`cli_errors` turns it into that one message on stderr and
exit code 2 instead of a traceback. The checks read only small files (config JSONs, folder
listings), so they cost milliseconds (see ``tests/test_bad_inputs.py``).

The same module holds the guards against silently wrong results: :func:`assert_finite` for
images/latents before they are written, and :class:`NonFiniteLossError` for training.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

log = logging.getLogger(__name__)

#: idgen-train's stages (``stage=...``)
STAGES = ("inversion", "finetune", "all", "data")
#: what a non-finite training loss does (``nonfinite_loss=...``)
NONFINITE_POLICIES = ("stop", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_MISSING = object()


class UserInputError(ValueError):
    """A mistake in what the user gave (config value, file, folder); shown without a traceback."""


class ConfigError(UserInputError):
    """``field=value`` is not usable: ``problem``; ``fix`` says what to do."""

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        shown = "<unset>" if value is _MISSING else repr(value)
        super().__init__(f"{field}={shown}: {problem}. {fix}")


class PathError(ConfigError, FileNotFoundError):
    """A configured file or folder is missing, of the wrong kind, or empty."""


class NonFiniteError(UserInputError, FloatingPointError):
    """A NaN/inf value where a result was about to be written or used (also a
    ``FloatingPointError``, what numeric code catches)."""


class NonFiniteLossError(NonFiniteError):
    """The training loss (or gradient) became NaN/inf; training stopped before the update."""


# --------------------------------------------------------------------------------- the CLI side

F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(task: F) -> F:
    """Decorate a Hydra task: a :class:`UserInputError` (or a missing model folder) becomes one
    ``error: ...`` line on stderr and exit code 2; programming errors keep their traceback."""
    from idgen.models.loading import SDLoadError  # a user's model path, reported the same way

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (UserInputError, SDLoadError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            # SystemExit is not an Exception: Hydra lets it through without printing a traceback.
            raise SystemExit(2) from None

    return wrapped  # type: ignore[return-value]


def accept_null_groups(argv: Sequence[str], config_dir: str | os.PathLike) -> list[str]:
    """``group=null`` on the command line means "no group" (Hydra's own spelling is ``~group``).

    Hydra refuses ``logger=null`` with a traceback ("Config group override must be a string or
    a list"); every other value may be null, so users type it. Only names of config groups (the
    folders of ``config_dir``) are rewritten.
    """
    out = list(argv[:1])
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and value in ("null", "None", "none") and (Path(config_dir) / key).is_dir():
            if value == "none" and (Path(config_dir) / key / "none.yaml").is_file():
                out.append(arg)  # a real config called none.yaml (e.g. callbacks=none)
                continue
            out.append(f"~{key}")
        else:
            out.append(arg)
    return out


# --------------------------------------------------------------------------- reading the config


def get(cfg: DictConfig, key: str, default: Any = _MISSING) -> Any:
    """``cfg``'s value at dotted ``key``, resolved; a ``???`` or unresolvable value is an error."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(
            key, _MISSING, "is required and not set", f"Pass {key}=<value> on the command line."
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(
            key, "<interpolation>", f"cannot be resolved ({err})", "Fix the interpolation."
        ) from None
    if value is _MISSING:
        return None if default is _MISSING else default
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_int(
    cfg: DictConfig,
    key: str,
    minimum: int | None = 1,
    optional: bool = False,
    multiple_of: int | None = None,
    extra: tuple[int, ...] = (),
    why: str = "",
) -> int | None:
    """An integer ``>= minimum`` (``None`` allowed when ``optional``; values in ``extra`` pass)."""
    value = get(cfg, key)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, "must be an integer", f"Pass {key}=<integer>.")
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(
                key, value, "must be an integer", f"Pass a whole number, e.g. {key}=64."
            )
    if value in extra:
        return value
    if minimum is not None and value < minimum:
        allowed = f" (or {', '.join(map(str, extra))})" if extra else ""
        raise ConfigError(
            key,
            value,
            f"must be >= {minimum}{allowed}{why}",
            f"Pass {key}=<integer >= {minimum}>.",
        )
    if multiple_of and value % multiple_of:
        lower = max(multiple_of, value - value % multiple_of)
        raise ConfigError(
            key,
            value,
            f"must be a multiple of {multiple_of}{why}",
            f"Use {key}={lower} or {key}={lower + multiple_of}.",
        )
    return value


def check_float(
    cfg: DictConfig,
    key: str,
    optional: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
    open_max: bool = False,
    positive: bool = False,
) -> float | None:
    """A finite number (``None`` allowed when ``optional``) within the given bounds."""
    value = get(cfg, key)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, "must be a number", f"Pass {key}=<number>.")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, value, "must be a number", f"Pass e.g. {key}=1.0.")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(
            key, value, "must be finite (NaN/inf make every result NaN)", f"Pass a finite {key}."
        )
    if positive and value <= 0:
        raise ConfigError(key, value, "must be > 0", f"Pass {key}=<positive number>.")
    if minimum is not None and value < minimum:
        raise ConfigError(key, value, f"must be >= {minimum}", f"Pass {key} >= {minimum}.")
    if maximum is not None and (value >= maximum if open_max else value > maximum):
        bound = f"< {maximum}" if open_max else f"<= {maximum}"
        raise ConfigError(key, value, f"must be {bound}", f"Pass {key} {bound}.")
    return value


def check_choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> Any:
    value = get(cfg, key)
    if value not in choices:
        raise ConfigError(
            key,
            value,
            f"is not one of {', '.join(map(str, choices))}",
            f"Pass {key}=<one of those>.",
        )
    return value


def _has_file(root: Path, extensions: Iterable[str] | None) -> bool:
    """Whether ``root`` holds (recursively) one file with one of ``extensions``; stops at the first."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    for _dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if name.startswith("."):
                continue
            if exts is None or name.lower().endswith(exts):
                return True
    return False


def check_dir(
    key: str,
    value: Any,
    what: str,
    extensions: Iterable[str] | None = None,
    nonempty: bool = True,
    noun: str = "folder",
) -> Path:
    """``value`` is an existing folder (holding a file with one of ``extensions`` when asked)."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(key, value, f"must be the path of {what}", f"Pass {key}=<folder>.")
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise PathError(
            key, str(value), f"{noun} '{path}' does not exist", f"Pass {key}=<folder of {what}>."
        )
    if not path.is_dir():
        raise PathError(
            key, str(value), "is a file, not a folder", f"Pass the folder that holds {what}."
        )
    if nonempty and not _has_file(path, extensions):
        kinds = f" with extensions {', '.join(extensions)}" if extensions else ""
        raise PathError(
            key, str(value), f"holds no files{kinds}", f"Put {what} there or pass another folder."
        )
    return path


def check_file(key: str, value: Any, what: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(key, value, f"must be the path of {what}", f"Pass {key}=<file>.")
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise PathError(key, str(value), f"file '{path}' does not exist", f"Pass {key}=<{what}>.")
    if not path.is_file():
        raise PathError(key, str(value), "is a folder, not a file", f"Pass the {what} itself.")
    return path


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
    target = str(model.get("_target_", ""))
    if target.endswith("build_tiny_sd"):
        # idgen.models.tiny's fixed geometry (a factor-8 VAE, 8x8x4 latents)
        return {
            "vae_factor": 8,
            "in_channels": 4,
            "sample_size": 8,
            "cross_attention_dim": int(model.get("cross_attention_dim") or 32),
            "name": "tiny",
        }
    source = model.get("pretrained")
    if not source:
        return {}
    source = os.path.expanduser(str(source))
    geometry: dict[str, Any] = {"name": str(model.get("pretrained"))}
    if not _looks_local(source):
        geometry["vae_factor"] = 8  # a hub id: the SD1.5 family's VAE
        return geometry
    vae = _read_json(Path(source) / "vae" / "config.json")
    if vae and vae.get("block_out_channels"):
        geometry["vae_factor"] = 2 ** (len(vae["block_out_channels"]) - 1)
    unet = _read_json(Path(source) / "unet" / "config.json")
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
    if pretrained and _looks_local(os.path.expanduser(str(pretrained))):
        from idgen.models.loading import missing_parts

        missing = missing_parts(os.path.expanduser(str(pretrained)))
        if missing:
            raise ConfigError(
                f"{key}.pretrained",
                str(pretrained),
                f"is not a Stable Diffusion folder in diffusers layout (missing {', '.join(missing)})",
                "Pass the folder that holds model_index.json, unet/, vae/, text_encoder/, "
                "tokenizer/ and scheduler/.",
            )
    return base_geometry(model)


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


def validate_train(cfg: DictConfig) -> None:
    """Every user-set value idgen-train needs, checked before data is scanned or models built."""
    stage = check_choice(cfg, "stage", STAGES)
    check_int(cfg, "seed", minimum=0)
    check_choice(cfg, "nonfinite_loss", NONFINITE_POLICIES)
    geometry = check_base_model(cfg)

    # data
    if cfg.get("data") is None:
        raise ConfigError("data", None, "no data configured", "Pass data=folder data.root=<dir>.")
    check_resolution(cfg, "data.resolution", geometry)
    check_int(cfg, "data.batch_size")
    check_int(cfg, "data.num_workers", minimum=0)
    check_int(cfg, "data.max_images", optional=True)
    if "num_images" in cfg.data:
        check_int(cfg, "data.num_images")
    if "val_fraction" in cfg.data:
        check_float(
            cfg, "data.val_fraction", optional=False, minimum=0.0, maximum=1.0, open_max=True
        )
    root = get(cfg, "data.root")
    target = str(get(cfg, "data._target_") or "")
    generated = "num_images" in cfg.data  # demo/toy-world data: made on first use
    if generated:
        if root and Path(os.path.expanduser(str(root))).is_file():
            raise ConfigError(
                "data.root", str(root), "is a file, not a folder", "Pass a folder (or leave it)."
            )
    elif target:
        extensions = get(cfg, "data.extensions") or IMAGE_EXTENSIONS
        check_dir("data.root", root, "the domain's images", extensions=extensions)

    if cfg.get("preview") is not None and get(cfg, "preview.enabled"):
        check_int(cfg, "preview.num_inference_steps")
        check_resolution(cfg, "preview.resolution", geometry)
        check_float(cfg, "preview.guidance_scale", optional=False)

    # stages
    if stage in ("inversion", "all"):
        check_int(cfg, "inversion_steps")
        check_int(cfg, "inversion_max_images", optional=True)
        check_float(cfg, "inversion.optimizer.lr", optional=False, positive=True)
    if stage in ("finetune", "all"):
        check_int(
            cfg,
            "trainer.max_steps",
            extra=(-1,) if (get(cfg, "trainer.max_epochs") or -1) > 0 else (),
            why=" (the number of optimizer steps of stage 2)",
        )
        check_float(cfg, "module.optimizer.lr", optional=False, positive=True)
        if "decoupled_sampling" in (cfg.get("callbacks") or {}):
            check_int(cfg, "callbacks.decoupled_sampling.every_n_train_steps", optional=True)
        ema = (cfg.get("callbacks") or {}).get("ema")
        if isinstance(ema, DictConfig) and "decay" in ema:  # ~callbacks.ema / null: no EMA
            check_float(
                cfg, "callbacks.ema.decay", optional=False, minimum=0.0, maximum=1.0, open_max=True
            )
        text_features = get(cfg, "text_features")
        if stage == "finetune" and text_features:
            path = Path(os.path.expanduser(str(text_features)))
            if path.is_dir():
                path = path / "text_features.safetensors"
            check_file("text_features", str(path), "a stage-1 text_features.safetensors")
        ckpt = get(cfg, "ckpt_path")
        if ckpt not in (None, "last"):
            check_file("ckpt_path", ckpt, "a training checkpoint (.ckpt), or pass ckpt_path=last")
        checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint")
        if checkpoint is not None:
            check_int(cfg, "callbacks.model_checkpoint.every_n_train_steps", optional=True)
            check_int(cfg, "callbacks.model_checkpoint.save_top_k", minimum=-1)
    check_int(cfg, "trainer.accumulate_grad_batches")
    check_int(cfg, "trainer.log_every_n_steps")
    logger = cfg.get("logger")
    if logger is not None and not isinstance(logger, DictConfig):
        raise ConfigError(
            "logger", logger, "must be a logger config group", "Pass logger=csv or logger=null."
        )


# -------------------------------------------------------------------------------- idgen-eval

DEVICES = ("auto", "cpu", "cuda", "mps")


def validate_eval(cfg: DictConfig) -> None:
    """idgen-eval's folders and numbers, checked before any image or feature extractor is read."""
    check_int(cfg, "batch_size")
    check_int(cfg, "resolution", optional=True)
    check_int(cfg, "seed", minimum=0)
    device = get(cfg, "device")
    if not isinstance(device, str) or not (
        device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ConfigError("device", device, "is not a device", "Pass device=auto, cpu or cuda:0.")
    if cfg.get("sample") is not None:
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
                "Run idgen-sample yourself and pass samples_dir=<its image folder> (and "
                "sample=null).",
            )
        for key in ("w_d", "w_c"):
            check_float(cfg, f"sample.{key}")
        subdir = get(cfg, "sample.images_subdir")
        if not subdir or not isinstance(subdir, str):
            raise ConfigError(
                "sample.images_subdir", subdir, "must be a folder name", "Pass e.g. samples."
            )
    else:
        samples = get(cfg, "samples_dir")
        if samples is None:
            raise ConfigError(
                "samples_dir",
                None,
                "is not set",
                "Pass samples_dir=<folder of generated images> (or configure sample=... to "
                "sample first).",
            )
        check_dir(
            "samples_dir",
            samples,
            "generated images",
            extensions=IMAGE_EXTENSIONS,
            noun="samples folder",
        )
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
        check_dir("reference_dir", reference, "domain images", extensions=IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------ idgen-sample

WEIGHT_MODES = ("auto", "fixed")
BASELINE_MODES = ("pipeline", "rectify")
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
    config = _read_json(path / DOMAIN_CONFIG)
    if config is None:
        raise ConfigError(
            key,
            str(folder),
            f"has no readable {DOMAIN_CONFIG}",
            "Pass the domain_model/ folder idgen-train exports (or export a checkpoint with "
            "`python -m idgen.modules.export CKPT OUT_DIR`).",
        )
    cls = config.get("_class_name")
    if cls != "NullTextUNet":
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
    unet = dict(config.get("unet_config") or {})
    mismatches = []
    for field, name in (
        ("in_channels", "latent channels"),
        ("sample_size", "latent sample size"),
        ("cross_attention_dim", "cross-attention width"),
    ):
        ours, theirs = unet.get(field), base.get(field)
        if ours is not None and theirs is not None and ours != theirs:
            mismatches.append(f"{name} {ours} (base model: {theirs})")
    meta = _read_json(path / "idgen_domain.json") or {}
    recorded = meta.get("base_model")
    configured = base.get("name")
    if recorded and configured and recorded not in ("unknown",) and recorded != configured:
        same = os.path.realpath(os.path.expanduser(str(recorded))) == os.path.realpath(
            os.path.expanduser(str(configured))
        )
        if not same:
            mismatches.append(f"trained on base '{recorded}' (configured: '{configured}')")
    if mismatches:
        raise ConfigError(
            key,
            str(folder),
            "was trained for another base model: " + "; ".join(mismatches),
            "Sample with the base it was trained on (model=...), or train a domain model on "
            "this base.",
        )
    return unet


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
    check_int(cfg, "seed", minimum=0)
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
            check_float(cfg, f"sampler.{key}")
    if "w0" in sampler:
        check_float(cfg, "sampler.w0", optional=False)
    if "strength" in sampler:
        check_float(cfg, "sampler.strength", minimum=0.0, maximum=1.0)
    if "weights" in sampler:
        check_choice(cfg, "sampler.weights", WEIGHT_MODES)
    if "baseline_mode" in sampler:
        check_choice(cfg, "sampler.baseline_mode", BASELINE_MODES)
    check_int(cfg, "sampler.num_inference_steps")
    check_scheduler("sampler.scheduler", get(cfg, "sampler.scheduler", "dpm++"))
    for key in ("domain_interval", "control_interval"):
        if key in sampler:
            check_interval(cfg, f"sampler.{key}")
    for i, term in enumerate(get(cfg, "sampler.extra_guidance") or []):
        weight = term.get("weight") if isinstance(term, dict) else None
        if weight not in (None, "auto") and (
            not isinstance(weight, int | float) or not math.isfinite(weight)
        ):
            raise ConfigError(
                f"sampler.extra_guidance.{i}.weight",
                weight,
                "must be a finite number or auto",
                "Pass a finite weight.",
            )
    domain = get(cfg, "domain_model")
    if domain:
        check_domain_model("domain_model", domain, geometry)
    baseline = get(cfg, "baseline_model")
    if baseline:
        check_dir("baseline_model", baseline, "an exported baseline", None)


# ---------------------------------------------------------------------------- results: finite


def is_finite(value: Any) -> bool:
    """Whether a tensor / array / number / nested dict or list of them holds no NaN or inf.

    PIL images are 8-bit (always finite): check the float image before it is converted.
    """
    import numpy as np
    import torch

    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, np.ndarray):
        return bool(np.isfinite(value).all()) if np.issubdtype(value.dtype, np.inexact) else True
    if isinstance(value, int | float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(is_finite(v) for v in value)
    return True


def assert_finite(value: Any, what: str, fix: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``what`` when ``value`` holds NaN/inf (nothing written)."""
    if not is_finite(value):
        raise NonFiniteError(
            f"{what} holds NaN or inf values; nothing was written for it. "
            + (fix or "Check the guidance weights (sampler.w_d, sampler.w_c) and the model files.")
        )


def assert_finite_images(items: Iterable[dict[str, Any]], keys: Sequence[str] = ()) -> None:
    """Check a batch of sample records (``{"index", "image", "guidance_weights", ...}``).

    Float tensors/arrays under any key and every guidance weight must be finite; ``keys`` limits
    the check to those keys. ``DecoupledGuidanceSampling`` calls it on the float pixels
    (``pixels``) and weights of every sampled batch, before any PNG is written or marked done.
    """
    for item in items:
        values = {k: item.get(k) for k in keys} if keys else item
        if not is_finite(values):
            bad = sorted(k for k, v in values.items() if not is_finite(v))
            raise NonFiniteError(
                f"sample {item.get('index')} (prompt {item.get('prompt')!r}) has non-finite "
                f"{', '.join(bad)}; it was not written and will be redone on the next run. "
                "Check sampler.w_d / sampler.w_c and the domain model's weights."
            )


# ------------------------------------------------------------------------------- run folders


def remove_stale_temp_files(root: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete what interrupted atomic writes leave under ``root`` and return it.

    ``idgen.utils.io`` writes ``.<name>.<random>.tmp`` files and ``.<name>.<random>`` folders
    (exports) next to their target and renames them when complete; ``replace_dir`` leaves
    ``.<name>.old-<pid>`` when killed between its two renames. A kill leaves them behind. Only
    entries older than ``min_age_s`` go (for folders other jobs may be writing into, e.g. caches).
    """
    import shutil
    import time

    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                path = here / name
                try:
                    if now - path.stat().st_mtime >= min_age_s:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    pass
        for name in list(dirs):
            # export_domain_model's mkdtemp(prefix=".<name>.") folders and replace_dir leftovers
            if name.startswith(".") and (".old-" in name or name.count(".") >= 2):
                path = here / name
                if name in (".cache", ".git", ".hydra") or name.startswith((".cache", ".git")):
                    continue
                try:
                    if now - path.stat().st_mtime >= min_age_s:
                        shutil.rmtree(path, ignore_errors=True)
                        removed.append(path)
                        dirs.remove(name)
                except FileNotFoundError:
                    pass
    for path in removed:
        log.info("removed the leftover of an interrupted write: %s", path)
    return removed
