"""One dtype parser: every field that names a dtype accepts the same spellings."""

from __future__ import annotations

import pytest
import torch

from idgen.models import build_tiny_sd
from idgen.models.loading import load_sd
from idgen.utils.dtypes import parse_dtype, parse_optional_dtype


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("torch.float16", torch.float16),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_spellings(name, dtype):
    assert parse_dtype(name, "dtype") is dtype


def test_unknown_names_the_field():
    with pytest.raises(ValueError, match=r"model\.torch_dtype='fp8' is not a dtype; use one of"):
        parse_dtype("fp8", "model.torch_dtype")
    assert parse_optional_dtype(None, "dtype") is None


def test_model_torch_dtype_takes_the_short_names(tmp_path):
    """``model.torch_dtype=fp16`` works as ``dtype=fp16`` does: the tiny builder and load_sd."""
    sd = build_tiny_sd(seed=0)
    sd.save_pretrained(tmp_path / "sd")
    loaded = load_sd(tmp_path / "sd", torch_dtype="fp16")
    assert loaded.unet.dtype == loaded.text_encoder.dtype == torch.float16
    assert build_tiny_sd(seed=0, torch_dtype="bf16").unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.torch_dtype"):
        load_sd(tmp_path / "sd", torch_dtype="float17")
