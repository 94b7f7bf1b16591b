"""The null-text domain transformer: the paper's Eq. 5 carried over to SD3's MMDiT.

SD1.5's UNet reads text only through cross-attention, so the paper replaces each cross-attention
output by a constant ``E_l`` (:mod:`idgen.models.null_text_unet`). SD3's ``SD3Transformer2DModel``
has no cross-attention: the text tokens are a second stream that joins the image tokens in every
block (joint attention over ``[image; text]``, each stream with its own QKV, MLP and
timestep-modulated norms), and the pooled text vector enters the timestep embedding. The
analogue of Eq. 5 is to make the *input* where text enters constant and learned: a fixed context
sequence ``C`` (``[T, joint_attention_dim]``) and pooled vector ``p``, both initialised from the
stage-1 ``F^T`` and its pooled embedding, trained with the rest of the transformer. The model has
no text input, needs no text encoder at training or sampling time, and is called as
``model(latents, t)``.

What differs from SD1.5's ``E_l``: the constant sits before the blocks, not at each block's
output, so the text stream is still computed (its tokens are updated by every block, modulated
by the timestep) and the image tokens still attend to it with weights that depend on the image.
The domain model therefore keeps a learned, image-dependent use of its context instead of a fixed
additive term per layer; it costs the text tokens' share of the attention and MLPs at every step
(T context tokens beside the image tokens), which SD1.5's version saved.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from idgen.models.loading import own_weights

CONTEXT_NAME = "context_tokens"
POOLED_NAME = "pooled_embedding"
# Written as qk_norm in config.json: SD3Transformer2DModel.from_pretrained(<our folder>) builds
# its attention with this qk_norm and raises instead of loading a default model with a warning.
MISLOAD_GUARD = (
    "NullTextSD3Transformer: load this folder with "
    "idgen.models.null_text_transformer.NullTextSD3Transformer.from_pretrained"
)


class NullTextSD3Transformer(ModelMixin, ConfigMixin):
    """An ``SD3Transformer2DModel`` without text input: a learned context sequence and pooled
    vector stand in for the text encoders' output.

    Build it with :meth:`from_transformer`; ``forward(latents, timestep)`` returns an object with
    ``.sample`` (the velocity). ``save_pretrained``/``from_pretrained`` as any diffusers model.
    """

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    @register_to_config
    def __init__(
        self, transformer_config: dict[str, Any], context_length: int, init: str = "value"
    ):
        super().__init__()
        self.register_to_config(qk_norm=MISLOAD_GUARD)
        clean = {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")}
        self.transformer = SD3Transformer2DModel(**clean)
        config = self.transformer.config
        self.context_tokens = nn.Parameter(torch.zeros(context_length, config.joint_attention_dim))
        self.pooled_embedding = nn.Parameter(torch.zeros(config.pooled_projection_dim))

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        config_dict = {k: v for k, v in config_dict.items() if k != "qk_norm"}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NullTextSD3Transformer:
        """``ModelMixin.from_pretrained`` with every weight in memory of its own (bit-exact
        round trip, see :func:`~idgen.models.loading.own_weights`)."""
        model = super().from_pretrained(*args, **kwargs)
        own_weights(model)
        return model

    @classmethod
    def from_transformer(
        cls,
        transformer: SD3Transformer2DModel,
        text_features: torch.Tensor,
        pooled_features: torch.Tensor,
        init: str = "value",
    ) -> NullTextSD3Transformer:
        """Copy ``transformer`` and set the context to ``text_features`` (``[1, T, D]`` or
        ``[T, D]``: SD3's joint text tokens, CLIP + T5 as the pipeline concatenates them) and the
        pooled vector to ``pooled_features`` (``[1, P]``). The source is not modified."""
        if init != "value":
            raise ValueError(
                f"init={init!r}: the SD3 null-text transformer starts from F^T itself; "
                "use module.init=value."
            )
        config = transformer.config
        tokens = text_features.reshape(-1, text_features.shape[-1])
        if tokens.shape[-1] != config.joint_attention_dim:
            raise ValueError(
                f"text_features has shape {tuple(text_features.shape)}; expected [1, T, "
                f"{config.joint_attention_dim}] (the transformer's joint_attention_dim)."
            )
        pooled = pooled_features.reshape(-1)
        if pooled.numel() != config.pooled_projection_dim:
            raise ValueError(
                f"pooled_features has {pooled.numel()} values; the transformer takes "
                f"{config.pooled_projection_dim} (pooled_projection_dim)."
            )
        with torch.device("meta"):
            model = cls(transformer_config=dict(config), context_length=tokens.shape[0], init=init)
        ref = next(transformer.parameters())
        state = {
            f"transformer.{k}": v.detach().clone() for k, v in transformer.state_dict().items()
        }
        state[CONTEXT_NAME] = tokens.detach().to(ref).clone()
        state[POOLED_NAME] = pooled.detach().to(ref).clone()
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(ref.device)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The learned context sequence and pooled vector."""
        return [self.context_tokens, self.pooled_embedding]

    def set_embeddings_trainable(self, trainable: bool) -> None:
        for p in self.embedding_parameters():
            p.requires_grad_(trainable)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        return_dict: bool = True,
        time_ids: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """The velocity ``v(sample, timestep)`` (``time_ids`` is accepted and ignored: SD3 has no
        size conditioning, and the training modules pass what the family gives)."""
        rows = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(rows)
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=sample.to(dtype),
            encoder_hidden_states=self.context_tokens.to(dtype).expand(rows, -1, -1),
            pooled_projections=self.pooled_embedding.to(dtype).expand(rows, -1),
            timestep=timestep,
            return_dict=return_dict,
        )
