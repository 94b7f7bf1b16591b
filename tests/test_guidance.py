"""Guidance math against closed-form values."""

import pytest
import torch

from idgen.guidance import (
    GuidanceTerm,
    auto_weight,
    cfg,
    decoupled_guidance,
    is_active,
    multi_guidance,
    per_sample_norm,
)


def _preds(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 4, 8, 8, generator=g) for _ in range(3)]


def test_multi_guidance_hand_computed():
    eps_0 = torch.tensor([[1.0, 2.0]])
    eps_1 = torch.tensor([[3.0, -2.0]])
    eps_2 = torch.tensor([[0.0, 4.0]])
    out = multi_guidance(eps_0, [eps_1, eps_2], [2.0, 0.5])
    # 1 + 2*(3-1) + 0.5*(0-1) = 4.5 ; 2 + 2*(-2-2) + 0.5*(4-2) = -5
    assert torch.equal(out, torch.tensor([[4.5, -5.0]]))


def test_decoupled_hand_computed():
    u, d, c = torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([-1.0])
    # (1 - 3 - 1.5) * 2 + 3 * 4 + 1.5 * -1 = -7 + 12 - 1.5
    assert decoupled_guidance(u, d, c, 3.0, 1.5).item() == pytest.approx(3.5)


def test_w_d_zero_is_cfg():
    u, d, c = _preds()
    out = decoupled_guidance(u, d, c, w_d=0.0, w_c=7.5)
    ref = u + 7.5 * (c - u)  # diffusers' CFG line
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(cfg(u, c, 7.5), ref)


def test_k_term_form_equals_three_term_form():
    u, d, c = _preds(1)
    w_d = torch.tensor([1.0, 2.5, 4.0])  # per-sample weights broadcast over C,H,W
    w_c = torch.tensor([3.0, 0.5, 2.0])
    three = decoupled_guidance(u, d, c, w_d, w_c)
    k_form = multi_guidance(u, [d, c], [w_d, w_c])
    torch.testing.assert_close(k_form, three, rtol=1e-5, atol=1e-5)
    # and sample 1 alone with float weights gives the same row
    torch.testing.assert_close(
        multi_guidance(u[1:2], [d[1:2], c[1:2]], [2.5, 0.5]), three[1:2], rtol=1e-5, atol=1e-5
    )


def test_multi_guidance_rejects_mismatch():
    u, d, c = _preds()
    with pytest.raises(ValueError, match="2 predictions but 1 weights"):
        multi_guidance(u, [d, c], [1.0])


def test_auto_weight_matches_formula_on_recorded_norms():
    u, d, c = _preds(2)
    d = d * torch.tensor([0.5, 2.0, 1.0]).view(3, 1, 1, 1)
    norms_u = [float(x.flatten().pow(2).sum().sqrt()) for x in u]
    norms_d = [float(x.flatten().pow(2).sum().sqrt()) for x in d]
    norms_c = [float(x.flatten().pow(2).sum().sqrt()) for x in c]
    w_d = auto_weight(u, d, w0=7.0, num_terms=2)
    w_c = auto_weight(u, c, w0=7.0, num_terms=2)
    for b in range(3):
        assert w_d[b].item() == pytest.approx(3.5 * norms_u[b] / norms_d[b], rel=1e-5)
        assert w_c[b].item() == pytest.approx(3.5 * norms_u[b] / norms_c[b], rel=1e-5)
    # the paper's balance: w0 |eps_sd| = w_d |eps_d| + w_c |eps_c|
    lhs = 7.0 * per_sample_norm(u)
    rhs = w_d * per_sample_norm(d) + w_c * per_sample_norm(c)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_auto_weight_zero_prediction_is_zero_not_nan():
    u, d, _ = _preds()
    d[1] = 0
    w = auto_weight(u, d)
    assert torch.isfinite(w).all() and w[1] == 0 and w[0] > 0


def test_is_active_interval():
    n = 10
    on = [i for i in range(n) if is_active(i, n, 0.2, 0.5)]
    assert on == [2, 3, 4]
    assert all(is_active(i, n) for i in range(n))
    assert not any(is_active(i, n, 0.0, 0.0) for i in range(n))
    with pytest.raises(ValueError, match="start <= end"):
        is_active(0, n, 0.6, 0.2)


def test_guidance_term_validation():
    with pytest.raises(ValueError, match="'style'.*weight"):
        GuidanceTerm(name="style", weight="big")
    with pytest.raises(ValueError, match="controlnet and control_image"):
        GuidanceTerm(name="edge", controlnet=object())
    with pytest.raises(ValueError, match="start=0.9"):
        GuidanceTerm(name="late", start=0.9, end=0.1)


def test_unnamed_terms_get_positional_names(tiny_sd):
    from idgen.pipelines import InDomainPipeline

    pipe = InDomainPipeline.from_sd(tiny_sd)
    terms = [GuidanceTerm(prompt="a red circle", weight=1.0), GuidanceTerm(weight=2.0)]
    out = pipe(
        "a photo", w_c=1.0, extra_guidance=terms, num_inference_steps=1, output_type="latent"
    )
    assert {k: v.tolist() for k, v in out.guidance_weights.items()} == {
        "control": [1.0],
        "extra_0": [1.0],
        "extra_1": [2.0],
    }
