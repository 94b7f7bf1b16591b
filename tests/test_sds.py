"""SDS on the multi-guidance mix: autograd against the closed form on the tiny model."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from idgen.guidance import GuidanceTerm, auto_weight, decoupled_terms
from idgen.models import NullTextUNet, build_tiny_sd
from idgen.models.text import encode_text
from idgen.sds import (
    MultiGuidanceSDS,
    TimestepSchedule,
    sds_loss,
    sds_terms,
    sds_weight,
    to_epsilon,
)

PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    sd = build_tiny_sd(seed=0)
    feats = sd.encode_prompt("a photo of a shape", "cpu", 1, False)[0]
    domain = NullTextUNet.from_unet(sd.unet, feats, init="value")
    # Move the domain model away from SD so that its term is distinguishable in every test.
    with torch.no_grad():
        for p in domain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sd, domain


def reference_predictions(sd, domain, z, noise, t):
    """eps_sd(z_t, ""), eps_sd(z_t, prompt), eps_d(z_t) with diffusers' own noising/encoding."""
    z_t = DDPMScheduler.from_config(sd.scheduler.config).add_noise(z, noise, t)
    cond, uncond = sd.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    b = z.shape[0]
    with torch.no_grad():
        eps_u = sd.unet(z_t, t, encoder_hidden_states=uncond.expand(b, -1, -1)).sample
        eps_c = sd.unet(z_t, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
        eps_d = domain(z_t, t).sample
    return eps_u, eps_c, eps_d


def draw(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([50, 500, 900])[:b]
    return z, noise, t


def test_gradient_equals_closed_form_decoupled(models):
    sd, domain = models
    w_d, w_c = 1.5, 2.0
    sds = MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=w_d, w_c=w_c)
    z, noise, t = draw()
    leaf = z.clone().requires_grad_(True)
    out = sds(latents=leaf, t=t, noise=noise)
    out.loss.backward()

    eps_u, eps_c, eps_d = reference_predictions(sd, domain, z, noise, t)
    eps_hat = (1 - w_d - w_c) * eps_u + w_d * eps_d + w_c * eps_c  # the paper's form
    w_t = (1 - sd.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
    expected = w_t * (eps_hat - noise)
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(leaf.grad, expected / z.shape[0], atol=1e-5, rtol=1e-4)
    assert out.grad.abs().max() > 1e-3  # not trivially zero
    assert set(out.weights) == {"domain", "control"}


def test_w_d_zero_is_cfg_sds_and_skips_the_domain_model(models):
    sd, domain = models
    calls = []
    handle = domain.register_forward_hook(lambda *a: calls.append(1))
    try:
        sds = MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=0, w_c=7.5)
        z, noise, t = draw()
        leaf = z.clone().requires_grad_(True)
        sds(latents=leaf, t=t, noise=noise).loss.backward()
    finally:
        handle.remove()
    assert calls == []

    eps_u, eps_c, _ = reference_predictions(sd, domain, z, noise, t)
    cfg = eps_u + 7.5 * (eps_c - eps_u)  # diffusers' StableDiffusionPipeline formula
    w_t = (1 - sd.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(leaf.grad, w_t * (cfg - noise) / 3, atol=1e-5, rtol=1e-4)


def test_pixel_gradient_flows_through_the_vae_encoder(models):
    sd, domain = models
    sds = MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=1.0, w_c=2.0)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 64, 64, generator=g).requires_grad_(True)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    out = sds(images, t=torch.tensor([300, 700]), noise=noise)
    out.loss.backward()
    # Chain rule by hand: d loss/d images = J_enc^T (grad / B).
    x = images.detach().clone().requires_grad_(True)
    z = sd.vae.encode(x * 2 - 1).latent_dist.mean * sd.vae.config.scaling_factor
    (expected,) = torch.autograd.grad(z, x, grad_outputs=out.grad / 2)
    torch.testing.assert_close(images.grad, expected, atol=1e-6, rtol=1e-4)
    assert torch.isfinite(out.loss) and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in sd.unet.parameters())


def test_renders_at_another_size_are_resized_to_the_model(models):
    sd, _ = models
    sds = MultiGuidanceSDS(sd, PROMPT, w_c=3.0)
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = sds(images, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.grad.shape == (1, 4, 8, 8) and images.grad.shape == images.shape


def test_auto_weights_are_held_and_resumable(models):
    sd, domain = models
    sds = MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=None, w_c=None, w0=7.0)
    z, noise, t = draw()
    out = sds(latents=z, t=t, noise=noise)
    z_t = DDPMScheduler.from_config(sd.scheduler.config).add_noise(z, noise, t)
    eps_0, preds = sds.predictions(z_t, t)
    for name in ("domain", "control"):
        expected = auto_weight(eps_0, preds[name], 7.0, num_terms=2).mean()
        assert sds.held[name] == pytest.approx(float(expected), rel=1e-5)
        torch.testing.assert_close(out.weights[name], torch.full((3,), sds.held[name]))
    # Held: a second call with other inputs keeps the weights.
    before = dict(sds.held)
    sds(latents=z * 3, t=t, noise=noise)
    assert sds.held == before
    again = MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=None, w_c=None)
    again.load_state_dict(sds.state_dict())
    torch.testing.assert_close(again(latents=z, t=t, noise=noise).grad, out.grad)


def test_term_interval_switches_off_by_timestep(models):
    sd, domain = models
    extra = GuidanceTerm(name="late_domain", model=domain, weight=2.0, start=0.5, end=1.0)
    sds = MultiGuidanceSDS(sd, PROMPT, w_c=1.0, extra_guidance=[extra])
    z, noise, t = draw()  # t = 50, 500, 900: fractions 0.95, 0.5, 0.1 of the schedule
    out = sds(latents=z, t=t, noise=noise)
    torch.testing.assert_close(out.weights["late_domain"], torch.tensor([2.0, 2.0, 0.0]))
    # With w_c = 1 and the extra term off, view 2 is exactly the conditional prediction.
    _, eps_c, _ = reference_predictions(sd, domain, z, noise, t)
    torch.testing.assert_close(out.noise_pred[2], eps_c[2], atol=1e-5, rtol=1e-4)


def test_to_epsilon_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = torch.tensor([0.9, 0.2])
    av = a.view(-1, 1, 1, 1)
    z_t = av.sqrt() * x0 + (1 - av).sqrt() * eps
    v = av.sqrt() * eps - (1 - av).sqrt() * x0
    torch.testing.assert_close(to_epsilon(v, z_t, a, "v_prediction"), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to_epsilon(x0, z_t, a, "sample"), eps, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        to_epsilon(v, z_t, a, "flow")


def test_timestep_schedule_anneals_and_validates():
    s = TimestepSchedule(0.02, 0.98, anneal="linear", max_step_end=0.5)
    assert s.bounds(0, 11) == (0.02, 0.98)
    assert s.bounds(10, 11)[1] == pytest.approx(0.5)
    assert s.bounds(5, 11)[1] == pytest.approx(0.74)
    sq = TimestepSchedule(0.02, 0.98, anneal="sqrt", max_step_end=0.5)
    assert sq.bounds(1, 101)[1] == pytest.approx(0.98 - 0.48 * 0.1)
    t = s.sample(4000, 1000, step=10, total_steps=11, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 500 and t.max() >= 490
    with pytest.raises(ValueError, match="min_step"):
        TimestepSchedule(0.6, 0.98, anneal="linear", max_step_end=0.5)
    with pytest.raises(ValueError, match="anneal"):
        TimestepSchedule(anneal="cosine")
    a = torch.tensor([0.25])
    assert float(sds_weight(a, "sds")) == pytest.approx(0.75)
    assert float(sds_weight(a, "fantasia3d")) == pytest.approx(0.5 * 0.75)
    with pytest.raises(ValueError, match="weighting"):
        sds_weight(a, "snr")


def test_bad_inputs_fail_early(models):
    sd, domain = models
    with pytest.raises(ValueError, match="domain_model"):
        MultiGuidanceSDS(sd, PROMPT, w_d=1.0, w_c=1.0)
    sds = MultiGuidanceSDS(sd, PROMPT, w_c=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        sds()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        sds(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="differ"):
        sds_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4))


def test_bfloat16_models_give_a_finite_float32_gradient():
    sd = build_tiny_sd(seed=0)
    sd.unet.to(torch.bfloat16)
    sds = MultiGuidanceSDS(sd, PROMPT, w_c=5.0)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = sds(latents=z, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.grad.dtype == torch.float32 and torch.isfinite(z.grad).all()


def test_image_target_gradient_is_pixels_minus_decoded_one_step_estimate(models):
    from diffusers import DDIMScheduler

    sd, domain = models
    w_d, w_c = 1.0, 3.0
    sds = MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=w_d, w_c=w_c, target="image")
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 64, generator=g).requires_grad_(True)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([400, 400])
    out = sds(images, t=t, noise=noise)
    out.loss.backward()

    with torch.no_grad():
        z = sd.vae.encode(images * 2 - 1).latent_dist.mean * sd.vae.config.scaling_factor
    eps_u, eps_c, eps_d = reference_predictions(sd, domain, z, noise, t)
    eps_hat = (1 - w_d - w_c) * eps_u + w_d * eps_d + w_c * eps_c
    # diffusers' DDIM computes the one-step estimate x0 = (z_t - sqrt(1-a) eps) / sqrt(a).
    ddim = DDIMScheduler.from_config(sd.scheduler.config)
    ddim.set_timesteps(50)
    z_t = DDPMScheduler.from_config(sd.scheduler.config).add_noise(z, noise, t)
    z0 = ddim.step(eps_hat, 400, z_t).pred_original_sample
    with torch.no_grad():
        x0 = (sd.vae.decode(z0 / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    w_t = 1 - sd.scheduler.alphas_cumprod[400]
    expected = w_t * (images.detach() - x0)
    torch.testing.assert_close(out.grad, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(images.grad, expected / 2, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="pixel renders"):
        sds(latents=z)


def test_controlnet_on_the_control_term_matches_diffusers_residuals(models):
    from diffusers import ControlNetModel

    sd, _ = models
    torch.manual_seed(1)
    cn = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():  # from_unet zero-initialises the outputs: make them matter
        for p in cn.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sds = MultiGuidanceSDS(sd, PROMPT, w_c=3.0, controlnet=cn)
    z, noise, t = draw(b=2)
    cond_image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = sds(latents=z, t=t, noise=noise, control_images={"control": cond_image})

    z_t = DDPMScheduler.from_config(sd.scheduler.config).add_noise(z, noise, t)
    cond, uncond = sd.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    with torch.no_grad():
        down, mid = cn(
            z_t,
            t,
            encoder_hidden_states=cond.expand(2, -1, -1),
            controlnet_cond=cond_image.expand(2, -1, -1, -1),
            return_dict=False,
        )
        eps_c = sd.unet(
            z_t,
            t,
            encoder_hidden_states=cond.expand(2, -1, -1),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        eps_u = sd.unet(z_t, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        plain = sd.unet(z_t, t, encoder_hidden_states=cond.expand(2, -1, -1)).sample
    torch.testing.assert_close(out.noise_pred, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    assert (eps_c - plain).abs().max() > 1e-4  # the ControlNet changed the prediction
    with pytest.raises(ValueError, match="control_images"):
        sds(latents=z, t=t, noise=noise)


def test_domain_interval_keeps_the_domain_term_to_high_noise(models):
    sd, domain = models
    sds = MultiGuidanceSDS(
        sd, PROMPT, domain_model=domain, w_d=2.0, w_c=1.0, domain_interval=(0.0, 0.5)
    )
    z, noise, t = draw()  # fractions 0.95, 0.5, 0.1
    out = sds(latents=z, t=t, noise=noise)
    torch.testing.assert_close(out.weights["domain"], torch.tensor([0.0, 2.0, 2.0]))
    torch.testing.assert_close(out.weights["control"], torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="interval"):
        MultiGuidanceSDS(sd, PROMPT, domain_model=domain, w_d=1.0, domain_interval=(0.8, 0.2))


def test_terms_are_samplings_guidance_terms_with_the_domain_model(models):
    sd, domain = models
    extra = [
        GuidanceTerm(model=domain, weight=2.0),
        GuidanceTerm(prompt="a blue square", weight=0),  # dropped, still counts for the name
        GuidanceTerm(prompt="a blue square", weight=1.0),
    ]
    sds = MultiGuidanceSDS(
        sd,
        PROMPT,
        domain_model=domain,
        w_d=1.5,
        w_c=None,
        control_interval=(0.2, 1.0),
        extra_guidance=extra,
    )
    assert [t.name for t in sds.terms] == ["domain", "control", "extra_0", "extra_2"]
    domain_term, control_term = decoupled_terms(1.5, None, control_interval=(0.2, 1.0))
    assert sds.terms[0] == GuidanceTerm(
        "domain", domain, weight=1.5, start=domain_term.start, end=domain_term.end
    )
    assert sds.terms[1] == control_term and control_term.model is None
    assert sds.terms[2].model is domain and sds.terms[2].weight == 2.0
    # Text features resolved once: none for the text-free models, the one prompt encoder's else.
    with torch.no_grad():
        expected = {p: encode_text(sd.tokenizer, sd.text_encoder, [p]) for p in (PROMPT, "")}
        blue = encode_text(sd.tokenizer, sd.text_encoder, ["a blue square"])
    assert sds.embeds["domain"] is None and sds.embeds["extra_0"] is None
    torch.testing.assert_close(sds.embeds["control"], expected[PROMPT])
    torch.testing.assert_close(sds.embeds["extra_2"], blue)
    torch.testing.assert_close(sds.uncond_embeds, expected[""])
    cond, _ = sd.encode_prompt(PROMPT, "cpu", 1, False)
    torch.testing.assert_close(sds.encode_text(PROMPT), cond)


def test_sds_terms_drop_and_check_like_sampling(models):
    _, domain = models
    # No domain model: no domain term; a weight of 0 drops a term; "auto" is None.
    assert [t.name for t in sds_terms(None, None, 2.0)] == ["control"]
    assert [t.name for t in sds_terms(domain, 0, None)] == ["control"]
    assert sds_terms(domain, "auto", 0)[0].weight == "auto"
    with pytest.raises(ValueError, match="used twice"):
        sds_terms(None, None, None, extra_guidance=[GuidanceTerm("control", weight=1.0)])
    with pytest.raises(ValueError, match="domain_interval"):
        sds_terms(domain, 1.0, 1.0, domain_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="control_interval"):
        sds_terms(domain, 1.0, 1.0, control_interval=(0.5, 1.5))
    pil = GuidanceTerm("edges", controlnet=object(), control_image=[1], weight=1.0)
    with pytest.raises(ValueError, match="SDS takes control_image"):
        sds_terms(None, None, None, extra_guidance=[pil])
