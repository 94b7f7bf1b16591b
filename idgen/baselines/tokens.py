"""Learned placeholder tokens ``[V]`` (textual inversion, Custom Diffusion's modifier token).

The new vectors live in a separate small parameter and are spliced into the text encoder's
token-embedding output by a forward hook, so the embedding matrix itself stays frozen: no other
row can change (not even through AdamW's decoupled weight decay) and the optimizer only ever
sees ``num_vectors x D`` numbers. Multi-vector tokens follow diffusers' convention
(``<v>``, ``<v>_1``, ...), so an exported embedding loads with ``load_textual_inversion``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def token_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' multi-vector names: ``<v>``, ``<v>_1``, ..., ``<v>_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(prompt: str, token: str, num_vectors: int) -> str:
    """``"a photo of <v> x"`` -> ``"a photo of <v> <v>_1 x"`` (what diffusers' pipeline does)."""
    return prompt.replace(token, " ".join(token_names(token, num_vectors)))


def add_placeholder_tokens(tokenizer, text_encoder: nn.Module, token: str, num_vectors: int) -> int:
    """Add the placeholder token(s) to ``tokenizer`` and grow ``text_encoder``'s embedding.

    Returns the id of the first new token; the new ids are consecutive.
    """
    if num_vectors < 1:
        raise ValueError(f"module.method.num_vectors={num_vectors} must be >= 1.")
    names = token_names(token, num_vectors)
    vocab = tokenizer.get_vocab()
    # a placeholder equal to a known word would also capture that word in every prompt
    clash = [n for n in names if n in vocab or f"{n}</w>" in vocab]
    added = 0 if clash else tokenizer.add_tokens(names)
    if added != num_vectors:
        raise ValueError(
            f"placeholder token {token!r} (or one of {names}) is already in the tokenizer's "
            "vocabulary; choose another module.method.token, e.g. '<sks>'."
        )
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + num_vectors)):
        raise RuntimeError(f"placeholder token ids {ids} are not consecutive")
    text_encoder.resize_token_embeddings(len(tokenizer))
    return ids[0]


@torch.no_grad()
def initial_vectors(
    tokenizer, text_encoder: nn.Module, initializer: str, num_vectors: int
) -> torch.Tensor:
    """``num_vectors`` copies of the mean input embedding of ``initializer``'s tokens."""
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(
            f"module.method.initializer={initializer!r} tokenizes to nothing; give a word such "
            "as the domain name."
        )
    table = text_encoder.get_input_embeddings().weight
    mean = table[torch.tensor(ids, device=table.device)].float().mean(0)
    return mean.expand(num_vectors, -1).clone()


class TokenSplice:
    """Forward hook replacing the embeddings of ids ``first_id ...`` by ``vectors`` rows."""

    def __init__(self, vectors: nn.Parameter, first_id: int):
        self.vectors = vectors
        self.first_id = first_id

    def __call__(self, module: nn.Module, inputs: Sequence[torch.Tensor], output: torch.Tensor):
        ids = inputs[0]
        offset = ids - self.first_id
        mask = (offset >= 0) & (offset < self.vectors.shape[0])
        if not bool(mask.any()):
            return output
        rows = self.vectors.to(output.dtype)[offset.clamp(0, self.vectors.shape[0] - 1)]
        return torch.where(mask.unsqueeze(-1), rows, output)


def splice_tokens(text_encoder: nn.Module, vectors: nn.Parameter, first_id: int):
    """Install the splice hook on the token embedding; returns the hook handle."""
    return text_encoder.get_input_embeddings().register_forward_hook(TokenSplice(vectors, first_id))


@torch.no_grad()
def write_vectors(text_encoder: nn.Module, vectors: torch.Tensor, first_id: int) -> None:
    """Copy learned vectors into the embedding rows (for export or hook-free use)."""
    table = text_encoder.get_input_embeddings().weight
    table[first_id : first_id + vectors.shape[0]] = vectors.to(table)
