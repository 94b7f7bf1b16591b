"""Table 1 baselines: what trains, #param, export -> plain diffusers, rectified sampling, configs."""

from __future__ import annotations

import copy
import functools

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from hydra.utils import instantiate
from torch import nn

from idgen.baselines import (
    OFT,
    CustomDiffusion,
    FullFinetune,
    LoRA,
    TextualInversion,
    load_baseline_pipeline,
)
from idgen.baselines.param_count import SD15_UNET_CONFIG, sd15_counts
from idgen.baselines.sampling import sample_baseline, with_scheduler
from idgen.models import build_tiny_sd
from idgen.modules.baselines import BaselineModule, template_prompt
from idgen.toyworld.demo import DemoDomainDataModule
from tests.conftest import compose_config

METHODS = {
    "finetune": lambda: FullFinetune(),
    "finetune_lora": lambda: LoRA(rank=2, alpha=4.0),
    "textual_inversion": lambda: TextualInversion(num_vectors=2),
    "custom_diffusion": lambda: CustomDiffusion(),
    "oft": lambda: OFT(r=4),
}
STEPS = 2
SAMPLE = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")


class _Snapshot(L.Callback):
    """Parameters right before the first optimizer step (after setup applied the method)."""

    def on_train_start(self, trainer, module):
        module.before = {n: p.detach().clone() for n, p in module.named_parameters()}


def _module(method, tmp_path, sd=None, **kw) -> BaselineModule:
    sd = sd or build_tiny_sd(seed=0)
    return BaselineModule(
        model_loader=lambda: sd,
        optimizer=functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=1e-2),
        method=method,
        domain="shapes",
        output_dir=str(tmp_path),
        **kw,
    )


def _fit(module, tmp_path, steps=STEPS, **kw):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Snapshot()],
        **kw,
    )
    data = DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=4, batch_size=2)
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    module = _module(METHODS[request.param](), tmp_path)
    _fit(module, tmp_path)
    return module


def _sample(pipe, prompt, seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **SAMPLE).images


def _target_linears(unet: nn.Module, targets) -> list[nn.Linear]:
    return [
        m
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and any(n.endswith(f".{t}") for t in targets)
    ]


def expected_count(method, unet: UNet2DConditionModel, text_hidden: int) -> int:
    """The method's parameter count in closed form, from the plain (unmodified) UNet."""
    tokens = method.num_vectors * text_hidden
    if isinstance(method, FullFinetune):
        return sum(p.numel() for p in unet.parameters())
    if isinstance(method, LoRA):  # A: r x in, B: out x r
        linears = _target_linears(unet, method.target_modules)
        return sum(method.rank * (m.in_features + m.out_features) for m in linears)
    if isinstance(method, TextualInversion):
        return tokens
    if isinstance(method, CustomDiffusion):  # cross-attention key and value projections
        linears = _target_linears(unet, ("attn2.to_k", "attn2.to_v"))
        return sum(m.weight.numel() for m in linears) + tokens
    if isinstance(method, OFT):  # r skew-symmetric blocks of size b = in / r
        linears = _target_linears(unet, method.target_modules)
        b = [m.in_features // method.r for m in linears]
        return sum(method.r * k * (k - 1) // 2 for k in b)
    raise AssertionError(method)


# --- what trains --------------------------------------------------------------------------------
def test_only_the_intended_parameters_change(trained):
    after = dict(trained.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), trained.before[n])}
    assert trainable, "the method selected nothing to train"
    assert changed <= trainable
    # The tiny UNet's mid block sees a 1x1 latent: self-attention over one token has a constant
    # softmax, so its query/key projections get exactly zero gradient. Everything else moves.
    single_token = ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "attn1.to_k")
    static = trainable - changed
    assert all(
        n.startswith("unet.mid_block") and any(s in n for s in single_token) for n in static
    ), static
    # The frozen SD parts are exactly the freshly built ones.
    fresh = build_tiny_sd(seed=0)
    for name in ("vae", "text_encoder"):
        ref = getattr(fresh, name).state_dict()
        for key, value in getattr(trained, name).state_dict().items():
            if key.endswith("token_embedding.weight"):
                value = value[: ref[key].shape[0]]  # rows added for [V] are checked below
            assert torch.equal(value, ref[key]), f"{name}.{key} changed"


def test_textual_inversion_updates_only_the_new_rows(tmp_path):
    module = _module(TextualInversion(num_vectors=2), tmp_path)
    _fit(module, tmp_path)
    table = module.text_encoder.get_input_embeddings().weight.detach().clone()
    module.pipeline()  # writes the learned vectors into their rows
    after = module.text_encoder.get_input_embeddings().weight.detach()
    first = module.first_token_id
    original = build_tiny_sd(seed=0).text_encoder.get_input_embeddings().weight
    assert torch.equal(after[:first], original)  # every old row bit-identical
    assert torch.equal(after[first : first + 2], module.token_vectors.detach())
    assert not torch.equal(after[first : first + 2], table[first : first + 2])  # rows were trained


def test_trainable_count_matches_the_selection(trained):
    fresh = build_tiny_sd(seed=0)
    hidden = fresh.text_encoder.config.hidden_size
    expected = expected_count(trained.method, fresh.unet, hidden)
    assert trained.num_trainable_params == expected
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == expected


def test_sd15_counts_match_closed_form():
    """On the SD1.5 UNet config (meta device): the figures reported for Table 1."""
    counts = sd15_counts()
    d = [320] * 5 + [640] * 5 + [1280] * 6  # widths of SD1.5's 16 transformer blocks
    ctx = SD15_UNET_CONFIG["cross_attention_dim"]
    assert counts["textual_inversion"] == 768
    assert counts["custom_diffusion"] == sum(2 * ctx * x for x in d) + 768
    assert (
        counts["custom_diffusion (attention=all)"] == sum(2 * ctx * x + 2 * x * x for x in d) + 768
    )
    # LoRA rank 1 on q, k, v, out of self- and cross-attention
    assert counts["finetune_lora"] == sum(8 * x + 2 * x + 2 * x + 2 * (ctx + x) for x in d)
    oft = sum(
        6 * 4 * (x // 4) * (x // 4 - 1) // 2 + 2 * 4 * (ctx // 4) * (ctx // 4 - 1) // 2 for x in d
    )
    assert counts["oft"] == oft
    assert 859e6 < counts["finetune"] < 860e6  # SD1.5 UNet: 859.5M


# --- export -> plain diffusers -----------------------------------------------------------------
def _plain_diffusers_load(folder, meta_method: str) -> StableDiffusionPipeline:
    """What a user without idgen writes for each export (diffusers + peft calls only)."""
    from peft import OFTConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = build_tiny_sd(seed=0)
    if meta_method == "finetune":
        pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    elif meta_method == "finetune_lora":
        pipe.load_lora_weights(folder)
    elif meta_method == "textual_inversion":
        pipe.load_textual_inversion(folder, weight_name="learned_embeds.safetensors", token="<v>")
    elif meta_method == "custom_diffusion":
        pipe.unet.load_attn_procs(
            folder, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe
        )
        pipe.load_textual_inversion(folder, weight_name="learned_embeds.safetensors", token="<v>")
    elif meta_method == "oft":
        pipe.unet.add_adapter(OFTConfig.from_pretrained(folder))
        set_peft_model_state_dict(pipe.unet, load_file(folder / "adapter_model.safetensors"))
    return pipe


@pytest.mark.slow  # five pipelines x 3 steps per method: ~10-20 s each on 2 busy cores
def test_export_loads_in_plain_diffusers_with_the_same_images(trained):
    folder = trained.export_path
    assert folder is not None and (folder / "idgen_baseline.json").is_file()
    ours = _sample(trained.pipeline(), trained.prompt)
    base = build_tiny_sd(seed=0)
    loaded = load_baseline_pipeline(folder, base)
    plain = _plain_diffusers_load(folder, trained.method.name)
    # Custom Diffusion loads into diffusers' non-SDPA processor: float-rounding differences.
    atol = 1e-4 if trained.method.name == "custom_diffusion" else 1e-5
    np.testing.assert_allclose(_sample(loaded, trained.prompt), ours, atol=atol)
    np.testing.assert_allclose(_sample(plain, trained.prompt), ours, atol=atol)
    # The adaptation is really there, and the base pipeline was left untouched.
    untrained_prompt = template_prompt("a photo of {token} {domain}", "shapes", None)
    assert np.abs(_sample(base, untrained_prompt) - ours).max() > 1e-3
    fresh = build_tiny_sd(seed=0)
    for name in ("unet", "text_encoder"):
        ref = getattr(fresh, name).state_dict()
        assert getattr(base, name).state_dict().keys() == ref.keys()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(base, name).state_dict().items())
    assert len(base.tokenizer) == len(fresh.tokenizer)


def test_checkpoint_holds_only_what_is_trained(tmp_path):
    module = _module(LoRA(), tmp_path)
    trainer = _fit(module, tmp_path, steps=1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(".lora_" in k for k in state), sorted(state)[:5]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(state) == trainable


# --- sampling ----------------------------------------------------------------------------------
def test_rectified_sampling_is_cfg_when_the_baseline_is_unchanged():
    sd = build_tiny_sd(seed=0)
    baseline = StableDiffusionPipeline(**dict(sd.components, unet=copy.deepcopy(sd.unet)))
    prompts, seeds = ["a photo of red circle"], [3]
    kw = dict(guidance_scale=5.0, num_inference_steps=3, output_type="np")
    plain = sample_baseline(baseline, prompts, seeds, **kw)
    rect = sample_baseline(baseline, prompts, seeds, rectify_with=sd, **kw)
    np.testing.assert_allclose(np.stack(rect), np.stack(plain), atol=1e-5)
    # diffusers' own CFG with the same scheduler and seed
    ref = with_scheduler(sd)(prompts[0], generator=torch.Generator().manual_seed(3), **kw).images[0]
    np.testing.assert_allclose(plain[0], ref, atol=1e-6)


def test_rectified_sampling_uses_the_frozen_unconditional(tmp_path):
    sd = build_tiny_sd(seed=0)
    unet = copy.deepcopy(sd.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    baseline = StableDiffusionPipeline(**dict(sd.components, unet=unet))
    kw = dict(guidance_scale=1.0, num_inference_steps=4, output_type="np")
    # with w = 1 rectified sampling is the baseline's conditional prediction alone ...
    rect = sample_baseline(baseline, ["a photo of shapes"], [0], rectify_with=sd, **kw)
    cond_only = with_scheduler(baseline)(
        "a photo of shapes", generator=torch.Generator().manual_seed(0), **kw
    ).images[0]
    np.testing.assert_allclose(rect[0], cond_only, atol=1e-5)
    # ... while w = 3 differs from the baseline's own CFG (its uncond is not used)
    kw["guidance_scale"] = 3.0
    rect = sample_baseline(baseline, ["a photo of shapes"], [0], rectify_with=sd, **kw)
    own = sample_baseline(baseline, ["a photo of shapes"], [0], **kw)
    assert np.abs(rect[0] - own[0]).max() > 1e-3


# --- configs and errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["finetune", "lora", "textual_inversion", "custom_diffusion", "oft"]
)
def test_module_configs_compose_lazily(tmp_path, name):
    cfg = compose_config("train", tmp_path, [f"module=baseline_{name}", "domain=shapes"])
    module = instantiate(cfg.module)
    assert isinstance(module, BaselineModule) and module.unet is None  # nothing loaded yet
    assert module.domain == "shapes"
    assert callable(module.optimizer_factory) and callable(module.model_loader)
    assert not (tmp_path / "data").exists()


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="prompt_template"):
        _module(LoRA(), tmp_path, prompt_template="a photo of {domain}")
    with pytest.raises(ValueError, match="does not divide"):
        OFT(r=3).prepare(build_tiny_sd(seed=0).unet)
    for token in ("<|endoftext|>", "shapes"):  # a special token; a word of the vocabulary
        module = _module(TextualInversion(token=token), tmp_path)
        with pytest.raises(ValueError, match="already in the tokenizer"):
            module.setup("fit")
    with pytest.raises(FileNotFoundError, match="idgen_baseline.json"):
        load_baseline_pipeline(tmp_path, build_tiny_sd(seed=0))
