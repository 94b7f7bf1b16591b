"""NullTextUNet: structure, equivalence with the source UNet, inits and serialisation."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention import BasicTransformerBlock

from idgen.models import NullTextUNet, build_tiny_sd
from idgen.models.null_text_unet import transformer_blocks


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd(seed=0)


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([3, 700][:batch] + [250] * max(0, batch - 2))
    return x, t


def test_attn2_and_norm2_parameters_are_removed(sd):
    model = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32))
    names = [n for n, _ in model.named_parameters()]
    blocks = transformer_blocks(model)
    assert len(blocks) == len(transformer_blocks(sd.unet)) > 0
    for block_name, block in blocks:
        assert block.attn2 is None and block.norm2 is None
        assert not any(n.startswith(f"unet.{block_name}.attn2.") for n in names)
        assert not any(n.startswith(f"unet.{block_name}.norm2.") for n in names)
    assert not any(".attn2." in n for n in names)


def test_parameter_count_is_source_minus_cross_attention_plus_embeddings(sd):
    model = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32))
    removed = 0
    dims = 0
    for _, block in transformer_blocks(sd.unet):
        removed += sum(p.numel() for p in block.attn2.parameters())
        removed += sum(p.numel() for p in block.norm2.parameters())
        dims += block.norm1.normalized_shape[0]
    source = sum(p.numel() for p in sd.unet.parameters())
    assert sum(p.numel() for p in model.parameters()) == source - removed + dims
    assert sum(p.numel() for p in model.embedding_parameters()) == dims


def test_forward_takes_no_text(sd):
    model = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32))
    params = inspect.signature(model.forward).parameters
    assert not any("encoder" in p or "text" in p or "context" in p for p in params)
    x, t = _inputs()
    with pytest.raises(TypeError):
        model(x, t, encoder_hidden_states=torch.randn(2, 77, 32))


def test_output_does_not_depend_on_text_side_of_the_source(sd):
    """Changing everything text-related (features, source attn2 weights) after the copy is a no-op."""
    feats = torch.randn(1, 77, 32)
    model = NullTextUNet.from_unet(sd.unet, feats)
    x, t = _inputs()
    before = model(x, t).sample
    source = build_tiny_sd(seed=0).unet
    other = NullTextUNet.from_unet(source, feats)
    with torch.no_grad():
        for _, block in transformer_blocks(source):
            for p in block.attn2.parameters():
                p.add_(1.0)
        feats.add_(5.0)
    torch.testing.assert_close(model(x, t).sample, before, rtol=0, atol=0)
    torch.testing.assert_close(other(x, t).sample, before, rtol=0, atol=0)


def test_single_token_value_init_matches_source_unet(sd):
    """One context token -> softmax is exactly 1 -> attn2(x, F) = to_out(to_v(F)) = E_l."""
    feats = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(1))
    model = NullTextUNet.from_unet(sd.unet, feats, init="value")
    x, t = _inputs()
    with torch.no_grad():
        ours = model(x, t).sample
        ref = sd.unet(x, t, encoder_hidden_states=feats.expand(2, -1, -1)).sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # and with random features the null-text model is a different function
    other = NullTextUNet.from_unet(sd.unet, torch.randn(1, 1, 32))
    assert not torch.allclose(other(x, t).sample, ref, atol=1e-4)


def test_value_init_is_attn2_under_uniform_attention(sd):
    """With zero queries the softmax is uniform over tokens: attn2 output = E_l (value init)."""
    feats = torch.randn(1, 77, 32)
    model = NullTextUNet.from_unet(sd.unet, feats, init="value")
    for (_, src), (_, dst) in zip(
        transformer_blocks(sd.unet), transformer_blocks(model.unet), strict=True
    ):
        attn2 = src.attn2
        saved = attn2.to_q.weight.detach().clone()
        with torch.no_grad():
            attn2.to_q.weight.zero_()
            out = attn2(torch.randn(1, 5, src.dim), encoder_hidden_states=feats)
            attn2.to_q.weight.copy_(saved)
        torch.testing.assert_close(out[0], dst.domain_embedding.expand(5, -1), atol=1e-5, rtol=1e-5)


def test_calibrated_init_is_mean_attn2_output(sd):
    """E_l equals the mean attn2 output recomputed independently (hooks on the source UNet)."""
    feats = torch.randn(1, 77, 32)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    model = NullTextUNet.from_unet(
        sd.unet,
        feats,
        init="calibrated",
        calibration_latents=latents,
        noise_scheduler=scheduler,
        generator=torch.Generator().manual_seed(3),
    )
    assert model.config.init == "calibrated"

    # Recompute: same generator draws (noise then timesteps, one chunk of 5 <= batch size 8).
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    noisy = scheduler.add_noise(latents, noise, t)
    outputs = {}
    hooks = [
        b.attn2.register_forward_hook(
            lambda _m, _i, o, name=name: outputs.__setitem__(name, o.reshape(-1, o.shape[-1]))
        )
        for name, b in transformer_blocks(sd.unet)
    ]
    with torch.no_grad():
        sd.unet(noisy, t, encoder_hidden_states=feats.expand(5, -1, -1))
    for h in hooks:
        h.remove()
    for name, block in transformer_blocks(model.unet):
        torch.testing.assert_close(
            block.domain_embedding, outputs[name].mean(0), atol=1e-5, rtol=1e-4
        )
    # differs from the value init (attention is not uniform)
    value = NullTextUNet.from_unet(sd.unet, feats, init="value")
    assert not torch.allclose(value.embedding_parameters()[0], model.embedding_parameters()[0])


def test_bad_inputs_give_clear_errors(sd):
    with pytest.raises(ValueError, match="cross_attention_dim|\\[1, T, 32\\]"):
        NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="calibration_latents"):
        NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32), init="calibrated")
    with pytest.raises(ValueError, match="init="):
        NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32), init="mean")


def test_source_unet_is_not_modified(sd):
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    model = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in sd.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(
        isinstance(b, BasicTransformerBlock) and b.attn2 is not None
        for _, b in transformer_blocks(sd.unet)
    )


def test_save_load_round_trip_is_bit_exact(sd, tmp_path):
    model = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32))
    with torch.no_grad():
        for p in model.embedding_parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "domain")
    loaded = NullTextUNet.from_pretrained(tmp_path / "domain")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, t = _inputs()
    assert torch.equal(model(x, t).sample, loaded(x, t).sample)


def test_gradient_checkpointing_gives_same_gradients(sd):
    x, t = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = NullTextUNet.from_unet(
            sd.unet, torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
        )
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model(x, t).sample.square().mean().backward()
        # every parameter (E included) gets a gradient: nothing unused for DDP
        assert all(p.grad is not None for p in model.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_embeddings_can_be_frozen(sd):
    model = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32))
    model.set_embeddings_trainable(False)
    assert all(not p.requires_grad for p in model.embedding_parameters())
    assert sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - len(
        model.embedding_parameters()
    )
