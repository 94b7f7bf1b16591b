"""The memory plan of a training run: expected peak memory by part, before any heavy work.

``idgen-train ... plan=true`` prints it and exits; every training run logs it at the start and
stops with it (one error, exit 2) when it exceeds the device's free memory. The numbers come
from the model's real parameter shapes (built on ``meta``), the optimizer's state per shape,
and the activations autograd saves (a forward pass on fake tensors): see
:mod:`idgen.memory.sizes`. What runs where:

- the trained network's weights, gradients, optimizer state and (``memory.ema=device``) EMA sit
  on the training device; the frozen VAE too;
- the base denoiser (UNet or SD3's transformer) and text encoder(s) that validation grids sample with stay in host memory in
  ``memory.frozen_dtype`` and join the device only while a grid is drawn;
- on a CPU run everything is host memory, plus the process's own runtime (Python, torch and the
  libraries: measured, not guessed, as the planning process's resident memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from idgen.memory.settings import MemorySettings, frozen_dtype
from idgen.memory.sizes import ModelSizes, activation_bytes
from idgen.utils.dtypes import parse_optional_dtype

GB = 1e9
#: common GPU sizes the plan reports against (GB as sold: 24 GB cards hold ~23.6 GiB usable)
GPU_SIZES = (24, 40, 80)
#: what a CUDA process holds outside torch's allocator (context, cuBLAS/cuDNN workspaces)
CUDA_OVERHEAD = 1.0 * GB
#: bitsandbytes keeps 8-bit states only for tensors of at least this many elements
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes' blockwise quantisation: one fp32 absmax per block per state
BNB_BLOCK = 256

#: what to try, one after the other, when a run does not fit: (override, what it changes)
LADDER: tuple[tuple[str, dict], ...] = (
    ("memory.frozen_dtype=bfloat16", {"frozen_dtype": "bfloat16"}),
    ("memory.gradient_checkpointing=true", {"gradient_checkpointing": True}),
    ("memory.ema=cpu", {"ema": "cpu"}),
    ("memory.optimizer=adamw8bit", {"optimizer": "adamw8bit"}),
    (
        "memory.fused_backward=true trainer.gradient_clip_val=null",
        {"fused_backward": True},
    ),
    ("memory.ema=off", {"ema": "off"}),
    ("memory.optimizer=adafactor", {"optimizer": "adafactor"}),
)


@dataclass
class RunShape:
    """What the plan needs of a run besides the model and the memory options."""

    stage: str = "finetune"  # "inversion" (stage 1) or "finetune" (stage 2)
    batch: int = 1
    resolution: int = 512
    precision: str = "32-true"
    accelerator: str = "cpu"
    validation: bool = True  # validation grids drawn during fine-tuning
    config_optimizer: str = "AdamW"  # module.optimizer's class when memory.optimizer=config
    ema_decay: float = 0.9999
    load_dtype: str | None = None  # model.torch_dtype: the base loads in it (None: float32)


@dataclass
class Plan:
    """Expected peak memory by part (bytes) on the training device and in host memory."""

    parts: dict[str, float]
    peak: float
    phase: str  # which phase sets the peak: setup, train step or validation
    device: str  # "cuda" or "cpu"
    settings: MemorySettings
    shape: RunShape
    phases: dict[str, float] = field(default_factory=dict)

    def table(self, fits: dict[int, str] | None = None) -> str:
        """A plain-text table: part, GB; then the peak and (optionally) the GPU sizes."""
        where = "GPU memory" if self.device == "cuda" else "host RAM (CPU run)"
        s = self.shape
        lines = [
            f"memory plan: stage {s.stage}, batch {s.batch}, {s.resolution}px, "
            f"precision {s.precision}, {where}"
            + (f", base loaded in {s.load_dtype}" if s.load_dtype else ""),
            f"  options: {_describe(self.settings)}",
        ]
        width = max(len(k) for k in self.parts) + 2
        for name, value in self.parts.items():
            lines.append(f"  {name:<{width}}{value / GB:8.2f} GB")
        for phase, value in self.phases.items():
            lines.append(f"  {'peak in ' + phase:<{width}}{value / GB:8.2f} GB")
        lines.append(f"  {'expected peak':<{width}}{self.peak / GB:8.2f} GB ({self.phase})")
        for size, how in (fits or {}).items():
            lines.append(f"  {size} GB GPU: {how}")
        return "\n".join(lines)


def _describe(settings: MemorySettings) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.to_dict().items())


def optimizer_state_bytes(name: str, shapes: Iterable[tuple[int, ...]]) -> float:
    """Bytes of optimizer state for parameters of these shapes (fp32 parameters)."""
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if name in ("adamw", "adamw_fused", "AdamW", "Adam"):
            total += 8 * n
        elif name == "adamw8bit":
            if n >= BNB_MIN_8BIT_SIZE:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
            else:
                total += 8 * n
        elif name == "adafactor":
            if len(shape) >= 2:  # factored second moment: row and column means
                total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            else:
                total += 4 * n
        elif name == "SGD":
            total += 4 * n  # momentum buffer
        else:
            total += 8 * n  # an unknown optimizer is planned as AdamW-sized
    return total


def _optimizer_name(settings: MemorySettings, shape: RunShape) -> str:
    return shape.config_optimizer if settings.optimizer == "config" else settings.optimizer


def estimate(
    sizes: ModelSizes,
    settings: MemorySettings,
    shape: RunShape,
    runtime_bytes: float = 0.0,
) -> Plan:
    """The plan of one stage (see the module docstring for what is counted where)."""
    cuda = shape.accelerator not in ("cpu",)
    precision = shape.precision
    frozen = frozen_dtype(settings.frozen_dtype, precision, shape.accelerator)
    fb = torch.finfo(frozen).bits // 8
    weight_b = 2 if precision in ("bf16-true", "16-true") else 4
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    parts: dict[str, float] = {}
    denoiser = sizes.denoiser_values  # parameters and buffers (SD3's position table)
    # the base as loaded (model.torch_dtype; float32 when unset)
    lb = torch.finfo(parse_optional_dtype(shape.load_dtype, "model.torch_dtype") or torch.float32)
    lb = lb.bits // 8
    base = (denoiser + sizes.text_encoder_params + sizes.vae_params) * lb
    # Loading (host memory): the base in its dtype, and while idgen.models.loading.own_weights
    # copies a component out of its memory-mapped file both copies are resident: the largest
    # component's (the denoiser; SD3.5 Medium with T5: T5-XXL's encoder).
    loading = base + max(denoiser, sizes.largest_text_encoder) * lb
    if not cuda:
        parts["runtime (Python, torch, libraries)"] = runtime_bytes
    acts = activation_bytes(
        sizes,
        shape.batch,
        shape.resolution,
        stage=shape.stage,
        autocast_dtype=autocast,
        frozen_dtype=frozen,
        checkpointing=settings.gradient_checkpointing,
    )
    if shape.stage == "inversion":
        # frozen denoiser + VAE; the text encoder encodes the prompt once and is dropped
        parts["frozen denoiser + VAE"] = (denoiser + sizes.vae_params) * fb
        parts["activations"] = acts
        fixed = sum(parts.values())
        # the base loads in host memory: on a GPU run the device gets the frozen parts only
        setup = (
            parts["frozen denoiser + VAE"]
            if cuda
            else parts["runtime (Python, torch, libraries)"] + loading
        )
        train = fixed
        phases = {"setup (loading the base model)": setup, "train step": train}
        phase = max(phases, key=phases.get)
        return Plan(parts, phases[phase], phase, "cuda" if cuda else "cpu", settings, shape, phases)

    n = sizes.domain_params
    shapes = sizes.domain_shapes
    largest = max(math.prod(s) for s in shapes) * 4
    # the domain model's weights: its trained parameters and the denoiser's buffers
    weights = (n + sizes.denoiser_buffers) * weight_b
    parts["weights (trained, fp32)" if weight_b == 4 else "weights (trained, half)"] = weights
    parts["gradients"] = 2 * largest if settings.fused_backward else n * weight_b
    parts["optimizer state"] = optimizer_state_bytes(_optimizer_name(settings, shape), shapes)
    ema_b = n * (2 if settings.ema_dtype == "bfloat16" else 4)
    ema_on_device = settings.ema == "device" or (settings.ema == "cpu" and not cuda)
    parts["EMA"] = ema_b if ema_on_device and settings.ema != "off" else 0.0
    parts["frozen VAE"] = sizes.vae_params * fb
    parts["activations"] = acts
    sampling = (denoiser + sizes.text_encoder_params) * fb if shape.validation else 0.0
    # on a GPU the sampling parts wait in host memory; on a CPU run they are the same RAM
    parts["validation (base denoiser + text encoders)"] = sampling
    runtime = parts.get("runtime (Python, torch, libraries)", 0.0)
    # A training step: everything but the sampling parts, which are off the device on a GPU.
    held = runtime + weights + parts["optimizer state"] + parts["EMA"] + parts["frozen VAE"]
    train = held + parts["gradients"] + acts + (0 if cuda else sampling)
    # Validation: no gradients (freed after the step) and no activations; the sampling parts
    # join the device; swapping in an EMA of another dtype or place backs the weights up.
    swap = 0.0
    if settings.ema != "off" and (settings.ema_dtype != "float32" or settings.ema == "cpu"):
        swap = 0 if cuda else weights  # the backup goes to host memory
    keep_grads = 0 if settings.set_to_none or settings.fused_backward else parts["gradients"]
    validation = held + keep_grads + sampling + swap if shape.validation else 0.0
    # Setup: the base model as loaded, plus the (float32) domain model copied from it.
    # (on a GPU run the base loads in host memory; the device gets the weights and the VAE)
    setup = runtime + max(loading, base + weights) if not cuda else weights + parts["frozen VAE"]
    # Checkpoints and the export stream to disk (no serialised copy in memory); the export
    # swaps the EMA in as validation does.
    phases = {"setup (loading the base model)": setup, "train step": train}
    if shape.validation:
        phases["validation grids"] = validation
    phase = max(phases, key=phases.get)
    return Plan(parts, phases[phase], phase, "cuda" if cuda else "cpu", settings, shape, phases)


def gpu_fits(
    sizes: ModelSizes,
    settings: MemorySettings,
    shape: RunShape,
    gpu_sizes: Sequence[int] = GPU_SIZES,
) -> dict[int, str]:
    """For each GPU size: "fits as configured" or the fewest :data:`LADDER` steps that make the
    run fit (planned on a CUDA device in the run's precision, ``bf16-mixed`` for a CPU run)."""
    gpu_shape = replace(shape, accelerator="cuda")
    if gpu_shape.precision in ("32-true", "32"):
        gpu_shape = replace(gpu_shape, precision="bf16-mixed")
    out: dict[int, str] = {}
    for size in gpu_sizes:
        budget = size * GB - CUDA_OVERHEAD
        current, steps = settings, []
        peak = estimate(sizes, current, gpu_shape).peak
        for override, change in LADDER:
            if peak <= budget:
                break
            if all(getattr(current, k) == v for k, v in change.items()):
                continue
            current = replace(current, **change)
            steps.append(override)
            peak = estimate(sizes, current, gpu_shape).peak
        gb = f"{peak / GB:.1f} GB planned"
        if peak > budget:
            out[size] = f"does not fit even with {' '.join(steps) or 'these settings'} ({gb})"
        elif not steps:
            out[size] = f"fits as configured ({gb})"
        else:
            out[size] = f"fits with {' '.join(steps)} ({gb})"
    return out


def lowest(sizes: ModelSizes, settings: MemorySettings, shape: RunShape, runtime: float) -> Plan:
    """The least memory idgen can plan for this run: every :data:`LADDER` step applied, with
    whichever optimizer needs the least state."""
    current = settings
    for _, change in LADDER:
        current = replace(current, **change)
    plans = [
        estimate(sizes, replace(current, optimizer=name), shape, runtime)
        for name in ("adamw8bit", "adafactor")
    ]
    return min(plans, key=lambda p: p.peak)
