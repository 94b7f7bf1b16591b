"""The Guider (one list of terms, per-term state) against hand-written loops, and the cost of the
guidance trace: no host sync per step when nobody asks for it."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from idgen.guidance import GuidanceTerm, Guider, decoupled_terms
from idgen.models import NullTextUNet, build_tiny_sd
from idgen.pipelines import InDomainPipeline
from idgen.sampling import GuidanceTrace

PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd(seed=0)


@pytest.fixture(scope="module")
def domain(sd):
    features = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    return NullTextUNet.from_unet(sd.unet, features, init="value")


def test_guider_reuses_the_direction_for_k_steps_and_holds_auto_weights():
    g = torch.Generator().manual_seed(0)
    eps0 = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(4)]
    eps1 = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(4)]
    term = GuidanceTerm("a", weight="auto", reuse_every=2)
    guider = Guider([term], num_steps=4, w0=6.0)
    assert [t.name for t in guider.to_predict(0)] == ["a"]
    out0 = guider.combine(0, eps0[0], {"a": eps1[0]})
    w = 6.0 * eps0[0].flatten(1).norm(dim=1) / eps1[0].flatten(1).norm(dim=1)  # w0/K, K = 1
    torch.testing.assert_close(out0, eps0[0] + w.view(-1, 1, 1, 1) * (eps1[0] - eps0[0]))
    assert guider.to_predict(1) == []  # reused at step 1 ...
    out1 = guider.combine(1, eps0[1], {})
    torch.testing.assert_close(out1, eps0[1] + w.view(-1, 1, 1, 1) * (eps1[0] - eps0[0]))
    assert [t.name for t in guider.to_predict(2)] == ["a"]  # ... predicted again at step 2
    out2 = guider.combine(2, eps0[2], {"a": eps1[2]})
    # the auto weight was fixed at the first active step
    torch.testing.assert_close(out2, eps0[2] + w.view(-1, 1, 1, 1) * (eps1[2] - eps0[2]))
    torch.testing.assert_close(guider.used_weights(2)["a"], w)


def test_decoupled_terms_drop_zero_weights():
    terms = decoupled_terms(w_d=None, w_c=0.0, domain_interval=(0.2, 0.8))
    assert [(t.name, t.model, t.weight, t.start, t.end) for t in terms] == [
        ("domain", "domain_unet", "auto", 0.2, 0.8)
    ]
    with pytest.raises(ValueError, match="reuse_every"):
        GuidanceTerm("x", reuse_every=0)


def _reference(sd, domain, steps: int, k: int, w_d: float, w_c: float) -> torch.Tensor:
    """The paper's loop written out: eps_u + w_d (eps_d - eps_u) + w_c (eps_c - eps_u), with the
    domain direction recomputed every k-th step and reused in between."""
    sched = DPMSolverMultistepScheduler.from_config(
        sd.scheduler.config, algorithm_type="dpmsolver++"
    )
    sched.set_timesteps(steps)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    ids = sd.tokenizer([PROMPT, ""], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        emb = sd.text_encoder(ids)[0]
        d_dir = None
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(z, t)
            eps_u, eps_c = sd.unet(
                torch.cat([x, x]), t, encoder_hidden_states=emb.flip(0)
            ).sample.chunk(2)
            if i % k == 0:
                d_dir = domain(x, t).sample - eps_u
            eps = eps_u + w_d * d_dir + w_c * (eps_c - eps_u)
            z = sched.step(eps, t, z).prev_sample
    return z


@pytest.mark.parametrize("k", [1, 2])
def test_pipeline_reuse_every_equals_the_written_out_loop(sd, domain, k):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    calls = []
    handle = domain.register_forward_hook(lambda *_: calls.append(1))
    try:
        # an interval covering the whole schedule is the full sampler
        terms = [
            GuidanceTerm("domain", "domain_unet", weight=2.0, start=0.0, end=1.0, reuse_every=k),
            GuidanceTerm("control", weight=3.0),
        ]
        ours = pipe(
            PROMPT,
            guidance=terms,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
    finally:
        handle.remove()
    assert len(calls) == (4 + k - 1) // k  # the domain model runs every k-th step only
    torch.testing.assert_close(ours, _reference(sd, domain, 4, k, 2.0, 3.0), rtol=1e-4, atol=1e-4)
    if k == 1:  # k = 1 is the plain shorthand call, bit for bit
        plain = pipe(
            PROMPT,
            w_d=2.0,
            w_c=3.0,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
        assert torch.equal(ours, plain)


SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def _count_syncs(monkeypatch, fn) -> int:
    """Calls of tensor methods that move data to the host (a device sync on accelerators)."""
    count = [0]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, **kw):
            count[0] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return count[0]


def test_trace_costs_no_host_sync_per_step_when_disabled(sd, domain, monkeypatch):
    ours = InDomainPipeline.from_sd(sd, domain_unet=domain)
    ref = StableDiffusionPipeline(**{**sd.components, "scheduler": ours.scheduler})
    ref.set_progress_bar_config(disable=True)

    def per_step(run) -> float:
        few = _count_syncs(monkeypatch, lambda: run(2))
        many = _count_syncs(monkeypatch, lambda: run(6))
        return (many - few) / 4

    def ours_run(steps, trace=None):
        out = ours(
            PROMPT,
            w_d=2.0,
            w_c=3.0,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=trace,
        )
        if trace is not None:
            trace.end_call(1, out.guidance_weights)

    def ref_run(steps):
        ref(
            PROMPT,
            guidance_scale=3.0,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )

    scheduler_only = per_step(ref_run)  # what diffusers' own loop (its scheduler) costs
    assert per_step(ours_run) <= scheduler_only
    # the counter does see the trace's transfers when it is on (after the call, per step)
    assert per_step(lambda s: ours_run(s, GuidanceTrace())) > scheduler_only
