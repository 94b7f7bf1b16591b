"""Score distillation on an SDXL base: the unconditional, control and domain predictions are
the SDXL UNet's with diffusers' conditioning (zero uncond, pooled text, the render size as
time_ids), and idgen-3d runs with model=tiny_sdxl."""

from __future__ import annotations

import torch

from idgen.guidance import CONTROL, DOMAIN
from idgen.models import FAMILIES, NullTextUNet, build_tiny_sdxl
from idgen.sds import MultiGuidanceSDS
from idgen.text_to_3d import text_to_3d
from tests.conftest import compose_config
from tests.test_3d_cli import FAST


def test_sdxl_sds_predictions_are_the_unets_with_diffusers_conditioning():
    sd = build_tiny_sdxl(seed=0)
    embeds, pooled = FAMILIES["sdxl"].encode_prompt(sd, ["a photo of cat"])
    domain = NullTextUNet.from_unet(sd.unet, embeds, pooled_features=pooled)
    sds = MultiGuidanceSDS(sd, "a red circle", domain_model=domain, w_d=1.0, w_c=2.0)
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    eps_0, preds = sds.predictions(z_t, t)

    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(2, -1)  # the render size, no crop
    text, _, text_pooled, _ = sd.encode_prompt(
        "a red circle", device="cpu", do_classifier_free_guidance=False
    )
    with torch.no_grad():
        zero = {"text_embeds": torch.zeros(2, 32), "time_ids": ids}
        uncond = sd.unet(
            z_t, t, encoder_hidden_states=torch.zeros(2, 77, 64), added_cond_kwargs=zero
        )
        cond = {"text_embeds": text_pooled.expand(2, -1), "time_ids": ids}
        control = sd.unet(
            z_t, t, encoder_hidden_states=text.expand(2, -1, -1), added_cond_kwargs=cond
        )
        dom = domain(z_t, t, time_ids=ids)
    torch.testing.assert_close(eps_0, uncond.sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(preds[CONTROL], control.sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(preds[DOMAIN], dom.sample, atol=1e-5, rtol=1e-5)
    assert (preds[CONTROL] - eps_0).abs().max() > 1e-3  # the prompt matters


def test_idgen_3d_runs_on_tiny_sdxl(tmp_path):
    cfg = compose_config(
        "3d", tmp_path, [*FAST, "model=tiny_sdxl", "steps=2", "checkpoint_every=0"]
    )
    summary = text_to_3d(cfg)
    assert summary["steps"] == 2
