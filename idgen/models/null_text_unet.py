"""The null-text domain UNet (paper §3.3, Eq. 4-5).

In every transformer block of an SD1.5-family UNet the cross-attention term
``to_out(softmax(Q K^T / sqrt(d)) V)`` is replaced by a per-layer constant embedding ``E_l``
added to the residual stream (``F' = E_l + F``). attn2 and its pre-norm ``norm2`` are removed,
so the model has no text input and every parameter takes part in every forward pass (DDP needs
no ``find_unused_parameters``).

SDXL-family UNets (``addition_embed_type="text_time"``) also take the pooled text embedding in
their added embedding: it becomes one more learned vector (``pooled_embedding``, initialised from
the pooled ``F^T``), while the size conditioning ``time_ids`` stays a real input of ``forward``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from idgen.models.loading import own_weights

EMBEDDING_NAME = "domain_embedding"
POOLED_NAME = "pooled_embedding"  # the pooled text input of an SDXL UNet's added embedding
#: added-embedding types whose text part a fixed vector can stand in for (SDXL)
TEXT_TIME = "text_time"
InitMode = Literal["value", "calibrated"]

# SD1.5's training noise schedule; every SD1.5-family checkpoint shares it.
_SD15_NOISE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


class NullTextTransformerBlock(BasicTransformerBlock):
    """A ``BasicTransformerBlock`` whose cross-attention is a learned constant ``E_l``.

    Only the ``layer_norm`` block of SD1.5-family UNets is supported; blocks are converted in
    place by :func:`convert_block` (``attn2``/``norm2`` set to ``None``, ``domain_embedding`` added).
    """

    domain_embedding: nn.Parameter

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The block is called by Transformer2DModel with (hidden_states, attention_mask,
        # encoder_hidden_states, ...); everything but the self-attention mask is text-related
        # and ignored here.
        attention_mask = kwargs.get("attention_mask", args[0] if args else None)

        # 1. Self-attention with its residual.
        norm_hidden_states = self.norm1(hidden_states)
        if self.pos_embed is not None:
            norm_hidden_states = self.pos_embed(norm_hidden_states)
        hidden_states = (
            self.attn1(norm_hidden_states, attention_mask=attention_mask) + hidden_states
        )
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        # 2. The cross-attention term, now a constant per layer (paper Eq. 5).
        hidden_states = hidden_states + self.domain_embedding.to(hidden_states.dtype)

        # 3. Feed-forward with its residual.
        norm_hidden_states = self.norm3(hidden_states)
        if self._chunk_size is not None:
            ff_output = _chunked_feed_forward(
                self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size
            )
        else:
            ff_output = self.ff(norm_hidden_states)
        hidden_states = ff_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def _check_block(name: str, block: BasicTransformerBlock) -> None:
    problems = []
    if block.attn2 is None:
        problems.append("it has no cross-attention (attn2)")
    if block.only_cross_attention or block.double_self_attention:
        problems.append("only_cross_attention/double_self_attention is set")
    if block.norm_type != "layer_norm":
        problems.append(f"norm_type is {block.norm_type!r}, expected 'layer_norm'")
    if hasattr(block, "fuser"):
        problems.append("it has a GLIGEN fuser")
    if problems:
        raise ValueError(
            f"Transformer block '{name}' is not an SD1.5-family block: {'; '.join(problems)}. "
            "NullTextUNet supports UNet2DConditionModels in SD1.5 layout only."
        )


def convert_block(block: BasicTransformerBlock, embedding: torch.Tensor | None = None) -> None:
    """Turn ``block`` into a :class:`NullTextTransformerBlock` in place.

    attn2 and norm2 are dropped (their parameters leave the model); ``embedding`` ([dim]) seeds
    ``E_l``, zeros when ``None``.
    """
    ref = block.norm1.weight if block.norm1.weight is not None else next(block.parameters())
    block.attn2 = None
    block.norm2 = None
    block.__class__ = NullTextTransformerBlock
    if embedding is None:
        embedding = torch.zeros(block.dim, dtype=ref.dtype, device=ref.device)
    block.register_parameter(EMBEDDING_NAME, nn.Parameter(embedding.detach().clone()))


def transformer_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """All transformer blocks of ``unet`` in module order, with their qualified names."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def removed_prefixes(unet: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the source UNet that the null-text UNet drops (attn2, norm2)."""
    return tuple(
        f"{name}.{part}." for name, _ in transformer_blocks(unet) for part in ("attn2", "norm2")
    )


def _as_tokens(text_features: torch.Tensor, dim: int) -> torch.Tensor:
    """Text features as [1, T, D]; accepts [T, D] or [1, T, D]."""
    if text_features.ndim == 2:
        text_features = text_features[None]
    if text_features.ndim != 3 or text_features.shape[0] != 1 or text_features.shape[-1] != dim:
        raise ValueError(
            f"text_features has shape {tuple(text_features.shape)}; expected [1, T, {dim}] or "
            f"[T, {dim}] (the text encoder's output features, D = the UNet's cross_attention_dim)."
        )
    return text_features


@torch.no_grad()
def value_embedding(attn2: nn.Module, text_features: torch.Tensor) -> torch.Tensor:
    """The paper's literal ``E = W_V(F^T)``: to_v on the tokens, mean over tokens, then to_out.

    This equals attn2's output when the attention weights are uniform over the tokens (and
    exactly when there is a single token, where the softmax is 1).
    """
    context = text_features.to(attn2.to_v.weight.dtype)
    if attn2.norm_cross is not None:
        context = attn2.norm_encoder_hidden_states(context)
    value = attn2.to_v(context).mean(dim=1)  # [1, inner_dim]
    out = attn2.to_out[0](value) / attn2.rescale_output_factor
    return out[0]


@torch.no_grad()
def calibrated_embeddings(
    unet: UNet2DConditionModel,
    text_features: torch.Tensor,
    calibration_latents: torch.Tensor,
    noise_scheduler: Any | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 8,
    pooled_features: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Mean attn2 output of every transformer block over noisy calibration latents.

    An SDXL-family UNet also gets the pooled ``F^T`` and each latent's ``time_ids`` (``[N, 6]``).

    Clean latents are noised to uniformly random timesteps with ``noise_scheduler`` (SD1.5's
    DDPM schedule when ``None``); the mean runs over the batch and all spatial positions, so it
    is the best constant (in L2) standing in for the softmax-weighted mix of value rows.
    """
    if noise_scheduler is None:
        noise_scheduler = DDPMScheduler(**_SD15_NOISE)
    num_t = noise_scheduler.config.num_train_timesteps
    param = next(unet.parameters())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            out = output.float().reshape(-1, output.shape[-1])
            sums[name] = sums.get(name, 0) + out.sum(dim=0)
            counts[name] = counts.get(name, 0) + out.shape[0]

        return hook

    blocks = transformer_blocks(unet)
    for name, block in blocks:
        hooks.append(block.attn2.register_forward_hook(make_hook(name)))
    try:
        for start in range(0, calibration_latents.shape[0], batch_size):
            # 1. Noise a chunk of clean latents to random timesteps.
            latents = calibration_latents[start : start + batch_size].to(param)
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
            t = torch.randint(0, num_t, (latents.shape[0],), generator=generator)
            noisy = noise_scheduler.add_noise(latents, noise.to(latents), t)
            # 2. Run the source UNet with F^T as context; the hooks accumulate attn2 outputs.
            context = text_features.to(param).expand(latents.shape[0], -1, -1)
            added = None
            if pooled_features is not None:
                added = {
                    "text_embeds": pooled_features.to(param).expand(latents.shape[0], -1),
                    "time_ids": time_ids[start : start + batch_size].to(param),
                }
            unet(noisy, t.to(param.device), encoder_hidden_states=context, added_cond_kwargs=added)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).to(param.dtype) for name, _ in blocks}


MISLOAD_GUARD = "NullTextUNet: load this folder with idgen.models.NullTextUNet.from_pretrained"


class NullTextUNet(ModelMixin, ConfigMixin):
    """An SD1.5-family UNet without text input: cross-attention replaced by constants ``E_l``.

    Build it with :meth:`from_unet`; ``forward(sample, timestep)`` returns an object with
    ``.sample``. ``save_pretrained``/``from_pretrained`` work as for any diffusers model.
    """

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_config: dict[str, Any], init: str = "value"):
        super().__init__()
        # Guard in config.json: UNet2DConditionModel.from_pretrained(<saved folder>) would build a
        # default UNet and drop every weight with only a warning; this key makes it fail loudly.
        self.register_to_config(down_block_types=[MISLOAD_GUARD])
        clean = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        self.unet = UNet2DConditionModel(**clean)
        blocks = transformer_blocks(self.unet)
        if not blocks:
            raise ValueError("unet_config builds a UNet without transformer blocks.")
        for name, block in blocks:
            _check_block(name, block)
            convert_block(block)
        self.pooled_embedding: nn.Parameter | None = None
        if self.unet.config.addition_embed_type == TEXT_TIME:
            size = pooled_size(self.unet)
            self.pooled_embedding = nn.Parameter(torch.zeros(size, device=self.unet.device))

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        config_dict = {k: v for k, v in config_dict.items() if k != "down_block_types"}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NullTextUNet:
        """``ModelMixin.from_pretrained``, with every weight in memory of its own (see
        :func:`~idgen.models.loading.own_weights`: a save/load round trip is bit-exact)."""
        model = super().from_pretrained(*args, **kwargs)
        own_weights(model)
        return model

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        text_features: torch.Tensor,
        init: InitMode | None = None,
        calibration_latents: torch.Tensor | None = None,
        noise_scheduler: Any | None = None,
        generator: torch.Generator | None = None,
        pooled_features: torch.Tensor | None = None,
        calibration_time_ids: torch.Tensor | None = None,
    ) -> NullTextUNet:
        """Copy ``unet`` into a null-text UNet with ``E_l`` initialised from ``text_features``
        (and, for an SDXL UNet, its pooled vector from ``pooled_features``).

        ``init="value"``: ``E_l = to_out(mean_tokens(to_v(F^T)))`` (the paper's ``W_V(F^T)``).
        ``init="calibrated"``: ``E_l`` = mean attn2 output with ``F^T`` as context over
        ``calibration_latents`` (clean VAE latents, noised to random timesteps). Default:
        ``calibrated`` when calibration latents are given, else ``value``.
        The source ``unet`` is not modified.
        """
        if init is None:
            init = "calibrated" if calibration_latents is not None else "value"
        if init not in ("value", "calibrated"):
            raise ValueError(f"init={init!r} is not supported; use 'value' or 'calibrated'.")
        if init == "calibrated" and calibration_latents is None:
            raise ValueError(
                "init='calibrated' needs calibration_latents (a batch of VAE latents of domain "
                "images); pass them or use init='value'."
            )
        added = unet.config.get("addition_embed_type")
        for key, ok in (
            ("encoder_hid_dim_type", (None,)),
            ("addition_embed_type", (None, TEXT_TIME)),
        ):
            if unet.config.get(key) not in ok:
                raise ValueError(
                    f"Source UNet has {key}={unet.config[key]!r}; NullTextUNet supports SD1.5- "
                    "and SDXL-family UNets (text through cross-attention, SDXL's pooled text)."
                )
        if added == TEXT_TIME and pooled_features is None:
            raise ValueError(
                "The source UNet takes a pooled text embedding (SDXL); pass pooled_features "
                "(the pooled F^T, [1, P]) to initialise the null-text UNet's pooled vector."
            )
        if added == TEXT_TIME and init == "calibrated" and calibration_time_ids is None:
            raise ValueError(
                "init='calibrated' on an SDXL UNet needs calibration_time_ids (each calibration "
                "latent's original size, crop and target size, [N, 6])."
            )
        text_features = _as_tokens(text_features, unet.config.cross_attention_dim)
        source_blocks = transformer_blocks(unet)
        for name, block in source_blocks:
            _check_block(name, block)

        # 1. E_l per block, computed on the untouched source UNet.
        if init == "value":
            embeddings = {n: value_embedding(b.attn2, text_features) for n, b in source_blocks}
        else:
            embeddings = calibrated_embeddings(
                unet,
                text_features,
                calibration_latents,
                noise_scheduler,
                generator,
                pooled_features=pooled_features if added == TEXT_TIME else None,
                time_ids=calibration_time_ids,
            )

        # 2. Same architecture built on the meta device (no random init), then filled with
        #    copies of the source weights minus attn2/norm2.
        with torch.device("meta"):
            model = cls(unet_config=dict(unet.config), init=init)
        removed = removed_prefixes(unet)
        state = {
            f"unet.{k}": v.detach().clone()
            for k, v in unet.state_dict().items()
            if not k.startswith(removed)
        }
        for name, _ in source_blocks:
            state[f"unet.{name}.{EMBEDDING_NAME}"] = embeddings[name].detach().clone()
        if added == TEXT_TIME:
            pooled = pooled_features.reshape(-1).to(next(unet.parameters()))
            if pooled.numel() != pooled_size(unet):
                raise ValueError(
                    f"pooled_features has {pooled.numel()} values; the UNet's added embedding "
                    f"takes {pooled_size(unet)} (text_encoder_2's projection_dim)."
                )
            state[POOLED_NAME] = pooled.detach().clone()
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(unet.device)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The per-layer embeddings ``E_l`` in module order (then SDXL's pooled vector)."""
        named = [p for n, p in self.named_parameters() if n.endswith(EMBEDDING_NAME)]
        return named + ([self.pooled_embedding] if self.pooled_embedding is not None else [])

    def set_embeddings_trainable(self, trainable: bool) -> None:
        for p in self.embedding_parameters():
            p.requires_grad_(trainable)

    def set_attn_processor(self, processor: Any) -> None:
        self.unet.set_attn_processor(processor)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        return_dict: bool = True,
        time_ids: torch.Tensor | None = None,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """``eps(sample, timestep)``; an SDXL-family model also needs each image's ``time_ids``
        (``[B, 6]``: original size, crop top-left, target size)."""
        added = None
        if self.pooled_embedding is not None:
            if time_ids is None:
                raise ValueError(
                    "this null-text UNet comes from an SDXL base: pass time_ids ([B, 6]: original "
                    "size, crop top-left, target size) as the base pipeline does."
                )
            rows = sample.shape[0]
            pooled = self.pooled_embedding.to(sample.dtype).expand(rows, -1)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(sample.device, sample.dtype)}
        # The inner UNet's blocks ignore encoder_hidden_states; None is passed only because
        # UNet2DConditionModel.forward requires the argument.
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=None,
            added_cond_kwargs=added,
            return_dict=return_dict,
        )


def pooled_size(unet: UNet2DConditionModel) -> int:
    """Width of the pooled text embedding an SDXL-family UNet's added embedding takes."""
    config = unet.config
    times = 6 * config.addition_time_embed_dim  # 6 size ids, each embedded
    return config.projection_class_embeddings_input_dim - times
