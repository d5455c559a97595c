"""Every paper method on a tiny ViT: what trains, VPT token layout, adapter gradients, linear without autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from methods import OptimConfig, create_method, list_methods
from methods.base import warmup_cosine
from tests.helpers.models import make_tiny_vit
from tests.helpers.paper import PAPER_METHODS
from tests.helpers.training import train_steps


def expected_trainable(method: str, name: str) -> bool:
    """The paper's definition of what each protocol tunes, by parameter name."""
    if name.startswith("backbone.head."):
        return True
    return {
        "full": True,
        "linear": False,
        "bias": name.startswith("backbone.") and name.endswith("bias"),
        "adapter": ".adapter." in name,
        "vpt_shallow": name == "vpt_prompts",
        "vpt_deep": name == "vpt_prompts",
    }[method]


def test_paper_methods_registered_in_order():
    assert list_methods()[:6] == PAPER_METHODS


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_training_changes_exactly_the_tuned_parameters(method, tiny_batch):
    torch.manual_seed(0)
    options = {"prompt_length": 3} if method.startswith("vpt") else {}
    model = create_method(method, make_tiny_vit(), num_classes=3, **options)
    for name, param in model.named_parameters():
        assert param.requires_grad == expected_trainable(method, name), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)  # two steps: an adapter's `down` only sees error once `up` left zero
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_tuned_and_total_params_and_summary_line(method):
    model = create_method(method, make_tiny_vit(), num_classes=3)
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.tuned_params == tuned and model.total_params >= tuned > 0
    assert model.param_summary().startswith(f"trainable params: {tuned:,d} || all params: {model.total_params:,d}")


def capture_block_inputs(model) -> list[torch.Tensor]:
    """Each block's input sequence as the paper writes it, [prefix, prompts, patches]: a KeyValuePromptBlock
    (VPT-deep) takes its prompts beside the sequence, so they are put back in place here."""
    inputs, prefix = [], model.backbone.num_prefix_tokens

    def capture(_module, args, kwargs):
        x, prompts = args[0].detach(), kwargs.get("prompts")
        if prompts is not None:
            prompts = prompts.detach().expand(x.shape[0], -1, -1)  # (1, p, D) where the batch shares them
            x = torch.cat([x[:, :prefix], prompts, x[:, prefix:]], dim=1)
        inputs.append(x.clone())

    for block in model.backbone.blocks:
        block.register_forward_pre_hook(capture, with_kwargs=True)
    return inputs


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_sequence_layout(deep, tiny_batch):
    p = 5
    model = create_method("vpt_deep" if deep else "vpt_shallow", make_tiny_vit(), num_classes=3, prompt_length=p).eval()
    inputs = capture_block_inputs(model)
    features = model.forward_features(tiny_batch[0])
    n_patches = model.backbone.patch_embed.num_patches
    assert all(x.shape == (4, 1 + p + n_patches, 32) for x in inputs)  # CLS + prompts + patches inside blocks
    assert features.shape == (4, 1 + n_patches, 32)  # prompts stripped before the head
    plain = model.backbone.patch_embed(tiny_batch[0])
    plain = model.backbone._pos_embed(plain)
    assert torch.allclose(inputs[0][:, 0], plain[:, 0]) and torch.allclose(inputs[0][:, 1 + p:], plain[:, 1:])
    assert torch.equal(inputs[0][0, 1:1 + p], model.vpt_prompts[0])  # prompts after CLS, before patches
    for layer in range(1, len(inputs)):
        prompt_slice = inputs[layer][:, 1:1 + p]
        if deep:  # a fresh prompt set replaces the previous block's prompt outputs
            assert torch.equal(prompt_slice[0], model.vpt_prompts[layer])
        else:  # shallow: prompt positions carry the previous block's outputs
            assert not torch.allclose(prompt_slice[0], model.vpt_prompts[0])
    assert model.vpt_prompts.shape == ((2 if deep else 1), p, 32)


def test_vpt_prompt_init_bound_and_dropout_defaults():
    deep = create_method("vpt_deep", make_tiny_vit(), num_classes=3)
    shallow = create_method("vpt_shallow", make_tiny_vit(), num_classes=3)
    bound = (6.0 / (3 * 8 * 8 + 32)) ** 0.5  # the VPT code's Xavier bound for the patch projection
    # 2 x 50 x 32 uniform draws: the largest misses the bound by ~bound / 3200
    assert deep.vpt_prompts.abs().max() <= bound and deep.vpt_prompts.abs().max() > 0.99 * bound
    assert deep.prompt_dropout.p == 0.1 and shallow.prompt_dropout.p == 0.0
    assert deep.vpt_prompts.shape[1] == 50  # paper default p


def test_vpt_on_register_token_geometry(tiny_batch):
    backbone = make_tiny_vit(reg_tokens=2, patch_size=4)
    model = create_method("vpt_deep", backbone, num_classes=3, prompt_length=4).eval()
    inputs = capture_block_inputs(model)
    logits = model(tiny_batch[0])
    assert logits.shape == (4, 3)
    assert inputs[0].shape[1] == 3 + 4 + 64  # CLS + 2 registers + prompts + 64 patches
    assert torch.equal(inputs[1][0, 3:7], model.vpt_prompts[1])  # inserted after all prefix tokens


def test_adapter_starts_as_identity_and_every_weight_learns(tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = make_tiny_vit()
    plain.load_state_dict(backbone.state_dict())
    model = create_method("adapter", backbone, num_classes=3, reduction=4).eval()
    plain.reset_classifier(3)
    plain.head.load_state_dict(model.backbone.head.state_dict())
    assert torch.allclose(model(tiny_batch[0]), plain.eval()(tiny_batch[0]), atol=1e-6)
    assert model.adapters()[0].down.out_features == 32 // 4
    train_steps(model, tiny_batch, steps=1)
    model.zero_grad()
    model.model_step(tiny_batch)[0].backward()
    for i, adapter in enumerate(model.adapters()):
        for name, param in adapter.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"adapter {i} {name} gets no gradient"


def test_adapter_reduction_must_divide_width():
    with pytest.raises(ValueError, match="does not divide the embedding width 32"):
        create_method("adapter", make_tiny_vit(), num_classes=3, reduction=5)


def test_linear_runs_backbone_without_autograd(tiny_batch):
    model = create_method("linear", make_tiny_vit(), num_classes=3)
    model.train()
    assert not model.backbone.training and model.training
    seen = {}
    model.backbone.blocks[-1].register_forward_hook(
        lambda _m, _i, out: seen.update(inference=torch.is_inference_mode_enabled(), grad=out.requires_grad))
    model.model_step(tiny_batch)[0].backward()
    assert seen == {"inference": True, "grad": False}
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if not n.startswith("head."))
    assert model.backbone.head.weight.grad is not None


def test_unknown_method_and_option_errors():
    with pytest.raises(ValueError, match="Did you mean 'vpt_deep'.*Known methods: full, linear"):
        create_method("vpt-deep", make_tiny_vit(), num_classes=3)
    with pytest.raises(ValueError, match="has no option"):
        create_method("full", make_tiny_vit(), num_classes=3, prompt_length=3)
    with pytest.raises(ValueError, match="prompt_length must be a positive integer"):
        create_method("vpt_deep", make_tiny_vit(), num_classes=3, prompt_length=0)


def test_schedule_warms_up_from_above_zero_and_ends_at_zero():
    assert warmup_cosine(0, warmup_steps=10, total_steps=100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)


def test_optimizer_holds_only_trainable_parameters():
    model = create_method("vpt_deep", make_tiny_vit(), num_classes=3, optim=OptimConfig(lr=0.1, weight_decay=0.01))
    model.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # the only trainer field it reads
    config = model.configure_optimizers()
    in_optimizer = {id(p) for group in config["optimizer"].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    # 10 steps, warmup round(10 * 1 / 10) = 1 step: the first multiplier is (0 + 1) / 1
    assert [g["lr"] for g in config["optimizer"].param_groups] == pytest.approx([0.1, 0.1])
    assert config["optimizer"].defaults["fused"] is True  # one fused update kernel, not a loop over tensors


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_update_equals_the_per_tensor_loop(optimizer):
    """The fused optimizer makes the same update as torch's default per-tensor implementation. One step: after
    that, Adam's g / sqrt(v) turns rounding-level differences in near-zero gradients into lr-sized ones."""
    torch.manual_seed(0)
    model = create_method("full", make_tiny_vit(), num_classes=3,
                          optim=OptimConfig(optimizer=optimizer, lr=0.05, weight_decay=0.01))
    model.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    fused = model.configure_optimizers()["optimizer"]
    groups = [{**g, "params": list(g["params"])} for g in fused.param_groups]
    reference_model = copy.deepcopy(model)
    reference_params = dict(reference_model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    reference_groups = [{k: v for k, v in g.items() if k != "fused"} | {"params": [reference_params[names[id(p)]] for p
                                                                                    in g["params"]]} for g in groups]
    reference = type(fused)(reference_groups, fused=False, foreach=False)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for m, opt in ((model, fused), (reference_model, reference)):
        opt.zero_grad()
        m.criterion(m(images), labels).backward()
        opt.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, reference_params[name], rtol=1e-5, atol=1e-6, msg=name)
