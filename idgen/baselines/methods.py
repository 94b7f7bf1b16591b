"""The Table 1 baselines as small objects: what each one trains, saves and loads.

Each method prepares a frozen SD UNet for training (``prepare``), writes its UNet-side
adaptation into an export folder in a format plain diffusers reads (``save_unet``), and applies
such a folder to a diffusers pipeline (``load_unet``). Learned placeholder tokens (textual
inversion, Custom Diffusion's modifier token) are handled by the module and
:mod:`idgen.baselines.tokens`; a method only says whether it learns one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import UNet2DConditionModel
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.bin"
OFT_CONFIG_FILE = "adapter_config.json"
OFT_WEIGHTS_FILE = "adapter_model.safetensors"
UNET_DIR = "unet"

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class BaselineMethod:
    """Base class: a frozen UNet, no placeholder token."""

    name: ClassVar[str] = "base"
    #: placeholder token learned with the method (None: the template's [V] is omitted)
    token: str | None = None
    num_vectors: int = 0
    initializer: str | None = None
    #: the model-family feature the method needs (``ModelFamily.features``): UNet-side methods
    #: need "baselines"; those learning a token in the (one) text encoder "baseline_tokens"
    feature: ClassVar[str] = "baselines"

    @property
    def trains_unet(self) -> bool:
        return True

    def prepare(self, unet: UNet2DConditionModel) -> None:
        """Make the method's UNet parameters trainable (the UNet arrives fully frozen)."""

    def save_unet(
        self, unet: UNet2DConditionModel, folder: Path, pipeline_class: type | None = None
    ) -> None:
        """Write the UNet-side adaptation into ``folder`` (``pipeline_class``: the family's
        diffusers pipeline, whose loader reads it back; ``StableDiffusionPipeline`` if None)."""

    @classmethod
    def load_unet(cls, folder: Path, pipe: Any, config: dict) -> None:
        """Apply a saved adaptation to ``pipe.unet`` (a copy owned by ``pipe``)."""

    def config(self) -> dict:
        """What ``load_unet`` needs besides the files (written to the export's metadata)."""
        return {}


class FullFinetune(BaselineMethod):
    """Vanilla fine-tuning: every parameter of the denoiser (SD's UNet, SD3's transformer);
    exported as plain diffusers weights in the pipeline's folder name (``unet/``,
    ``transformer/``), so ``<pipeline>.from_pretrained(base, unet=...)`` reads it."""

    name = "finetune"
    # the one baseline every family has: it needs nothing but the family's denoiser
    feature = "baseline_finetune"

    def prepare(self, unet: nn.Module) -> None:
        unet.requires_grad_(True)

    def save_unet(self, unet, folder, pipeline_class=None) -> None:
        unet.save_pretrained(folder / denoiser_dir(unet))

    @classmethod
    def load_unet(cls, folder: Path, pipe: Any, config: dict) -> None:
        from idgen.models.family import family_of

        name = family_of(pipe).denoiser_name
        base = getattr(pipe, name)
        path = folder / name
        if not path.is_dir():
            found = [p.name for p in folder.iterdir() if (p / "config.json").is_file()]
            raise ValueError(
                f"baseline export '{folder}' has no {name}/ for this base's denoiser "
                f"(it holds {found or 'no model folder'}); was it trained on another family?"
            )
        model = type(base).from_pretrained(path, torch_dtype=base.dtype)
        pipe.register_modules(**{name: model.to(base.device)})


def denoiser_dir(model: nn.Module) -> str:
    """The pipeline folder name of a denoiser: ``unet`` or (SD3's MMDiT) ``transformer``."""
    return UNET_DIR if isinstance(model, UNet2DConditionModel) else "transformer"


class LoRA(BaselineMethod):
    """peft LoRA on the UNet attention projections; exported in diffusers' LoRA format.

    Defaults (rank 1 on ``to_q/to_k/to_v/to_out.0`` of every attention layer) give 199,296
    parameters on the SD1.5 UNet: the paper's "0.19M" row.
    """

    name = "finetune_lora"

    def __init__(
        self,
        rank: int = 1,
        alpha: float | None = None,
        target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
        init_lora_weights: str | bool = "gaussian",
    ) -> None:
        if rank < 1:
            raise ValueError(f"module.method.rank={rank} must be >= 1.")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.target_modules = list(target_modules)
        self.init_lora_weights = init_lora_weights

    def prepare(self, unet: UNet2DConditionModel) -> None:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=self.rank,
                lora_alpha=self.alpha,
                target_modules=self.target_modules,
                init_lora_weights=self.init_lora_weights,
            )
        )

    def save_unet(self, unet, folder, pipeline_class=None) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        (pipeline_class or StableDiffusionPipeline).save_lora_weights(
            folder,
            unet_lora_layers=layers,
            weight_name=LORA_FILE,
            # rank and alpha travel with the weights, so loaders get the trained scaling
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )

    @classmethod
    def load_unet(cls, folder: Path, pipe: Any, config: dict) -> None:
        pipe.load_lora_weights(folder, weight_name=LORA_FILE)

    def config(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules}


class TextualInversion(BaselineMethod):
    """Only ``num_vectors`` new token embeddings for ``[V]``; the UNet stays frozen."""

    name = "textual_inversion"
    feature = "baseline_tokens"

    def __init__(self, token: str = "<v>", num_vectors: int = 1, initializer: str | None = None):
        self.token = token
        self.num_vectors = num_vectors
        self.initializer = initializer

    @property
    def trains_unet(self) -> bool:
        return False


class CustomDiffusion(BaselineMethod):
    """Custom Diffusion: attention key/value projections + the modifier token.

    ``attention="cross"`` (Kumari et al.; diffusers' ``train_custom_diffusion.py``) trains the
    cross-attention ``to_k``/``to_v`` (19.2M on SD1.5); ``"all"`` also trains the
    self-attention ones (44.0M on SD1.5, the count in the paper's Table 1). Trained through
    diffusers' Custom Diffusion attention processors and exported in their format.
    """

    name = "custom_diffusion"
    feature = "baseline_tokens"

    def __init__(
        self,
        token: str = "<v>",
        num_vectors: int = 1,
        initializer: str | None = None,
        attention: str = "cross",
    ) -> None:
        if attention not in ("cross", "all"):
            raise ValueError(f"module.method.attention={attention!r}: use 'cross' or 'all'.")
        self.token = token
        self.num_vectors = num_vectors
        self.initializer = initializer
        self.attention = attention

    def _trains(self, name: str) -> bool:
        return name.endswith("attn2.processor") or self.attention == "all"

    def prepare(self, unet: UNet2DConditionModel) -> None:
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        processors = {}
        state = unet.state_dict()
        for name in unet.attn_processors:
            layer = name[: -len(".processor")]
            if not self._trains(name):
                processors[name] = CustomDiffusionAttnProcessor2_0(
                    train_kv=False, train_q_out=False
                )
                continue
            to_k = state[f"{layer}.to_k.weight"]
            with torch.device(to_k.device):  # "meta" when only counting parameters
                proc = CustomDiffusionAttnProcessor2_0(
                    train_kv=True,
                    train_q_out=False,
                    hidden_size=to_k.shape[0],
                    cross_attention_dim=to_k.shape[1],
                )
            # start from the pretrained projections (copies: to_k/to_v themselves stay frozen)
            proc.load_state_dict(
                {
                    "to_k_custom_diffusion.weight": to_k.clone(),
                    "to_v_custom_diffusion.weight": state[f"{layer}.to_v.weight"].clone(),
                },
                assign=True,
            )
            processors[name] = proc.to(dtype=to_k.dtype)
        unet.set_attn_processor(processors)
        for name, proc in unet.attn_processors.items():
            if self._trains(name):
                proc.requires_grad_(True)

    def save_unet(self, unet, folder, pipeline_class=None) -> None:
        # diffusers' layout (UNet2DConditionModel.save_attn_procs): weights per trained
        # processor, an empty entry for the others so every attention layer gets a processor.
        state: dict[str, Any] = {}
        for name, proc in unet.attn_processors.items():
            weights = proc.state_dict()
            if not weights:
                state[name] = {}
            for key, value in weights.items():
                state[f"{name}.{key}"] = value.detach().cpu().contiguous()
        torch.save(state, folder / CUSTOM_DIFFUSION_FILE)

    @classmethod
    def load_unet(cls, folder: Path, pipe: Any, config: dict) -> None:
        # diffusers 0.42 only installs the loaded processors when `_pipeline` is passed
        # (otherwise load_attn_procs silently does nothing), so pass it.
        pipe.unet.load_attn_procs(folder, weight_name=CUSTOM_DIFFUSION_FILE, _pipeline=pipe)

    def config(self) -> dict:
        return {"attention": self.attention}


class OFT(BaselineMethod):
    """peft OFT (orthogonal fine-tuning) on the UNet attention projections.

    ``r`` block-diagonal rotation blocks per layer (OFT's SD setting: 4). peft stores only the
    free (skew-symmetric) half of each block: 11.6M on SD1.5 for ``r=4``, i.e. the 23.3M block
    entries counted in the paper's Table 1.
    """

    name = "oft"

    def __init__(
        self,
        r: int = 4,
        target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = False,
    ) -> None:
        if r < 1:
            raise ValueError(f"module.method.r={r} must be >= 1.")
        self.r = r
        self.target_modules = list(target_modules)
        self.coft = coft
        self.eps = eps
        self.block_share = block_share
        self.use_cayley_neumann = use_cayley_neumann

    def peft_config(self):
        from peft import OFTConfig

        return OFTConfig(
            r=self.r,
            oft_block_size=0,
            target_modules=self.target_modules,
            coft=self.coft,
            eps=self.eps,
            block_share=self.block_share,
            use_cayley_neumann=self.use_cayley_neumann,
        )

    def prepare(self, unet: UNet2DConditionModel) -> None:
        _check_divisible(unet, self.target_modules, self.r)
        unet.add_adapter(self.peft_config())

    def save_unet(self, unet, folder, pipeline_class=None) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        unet.peft_config["default"].save_pretrained(folder)
        state = {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()
        }
        save_file(state, folder / OFT_WEIGHTS_FILE)

    @classmethod
    def load_unet(cls, folder: Path, pipe: Any, config: dict) -> None:
        from peft import OFTConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        pipe.unet.add_adapter(OFTConfig.from_pretrained(folder))
        result = set_peft_model_state_dict(pipe.unet, load_file(folder / OFT_WEIGHTS_FILE))
        missing = [k for k in result.missing_keys if "oft_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"OFT weights in '{folder}' do not fit this UNet: missing {missing[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}; was it trained on another base model?"
            )

    def config(self) -> dict:
        return {"r": self.r, "target_modules": self.target_modules}


def _check_divisible(unet: nn.Module, targets: Sequence[str], r: int) -> None:
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in targets):
            if module.in_features % r:
                raise ValueError(
                    f"module.method.r={r} does not divide {name}.in_features={module.in_features}; "
                    "OFT needs r | in_features for every target layer."
                )


METHODS: dict[str, type[BaselineMethod]] = {
    m.name: m for m in (FullFinetune, LoRA, TextualInversion, CustomDiffusion, OFT)
}


def method_class(name: str) -> type[BaselineMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown baseline method {name!r}; known: {sorted(METHODS)}.")
    return METHODS[name]
