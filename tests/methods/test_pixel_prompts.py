"""VPT on ConvNets (methods/pixel_prompts.py through vpt_shallow) against references written here: the official "pad"
prompt (KMnP/vpt src/models/resnet.py `incorporate_prompt`: left/right bands, then top/bottom over the full width,
around the unresized S x S image, normalised like an image), its uniform(0, 1) init, the "below" channels and the
extended first conv, what trains, the official parameter count on ResNet-50, and the one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch

from backbones import create_backbone
from benchmark.params import count_params
from methods import create_method
from tests.helpers.models import CONV_32PX, TINY_CONVNETS, make_tiny_convnet, make_tiny_vit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ResNet/ConvNeXt data config
KINDS = list(TINY_CONVNETS)


def pad_count(p: int, size: int) -> int:
    """The official pad prompt's parameters: tb (1, 3, 2p, S + 2p) + lr (1, 3, S, 2p)."""
    return 3 * 2 * p * (size + 2 * p) + 3 * size * 2 * p


def reference_pad(image: torch.Tensor, tb: torch.Tensor, lr: torch.Tensor, p: int, mean, std) -> torch.Tensor:
    """The padded image written out by position: the S x S image at rows/columns p..p+S, the left band (lr's first
    p columns) and right band (its last p) beside it, the top band (tb's first p rows) and bottom (its last p) over
    the full width S + 2p; every band normalised as the image was."""
    batch, channels, size, _ = image.shape
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    tb, lr = (tb - m) / s, (lr - m) / s
    out = torch.full((batch, channels, size + 2 * p, size + 2 * p), float("nan"))
    out[:, :, p:p + size, p:p + size] = image
    out[:, :, p:p + size, :p] = lr[..., :p]
    out[:, :, p:p + size, p + size:] = lr[..., p:]
    out[:, :, :p, :] = tb[:, :, :p]
    out[:, :, p + size:, :] = tb[:, :, p:]
    assert not out.isnan().any()  # every pixel placed exactly once
    return out


def first_conv_input(model, images: torch.Tensor) -> torch.Tensor:
    name = model.backbone.pretrained_cfg["first_conv"]
    seen = []
    handle = model.backbone.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return seen[0], logits


@pytest.mark.parametrize("kind", KINDS)
def test_pad_prompt_surrounds_the_unresized_image_as_the_official_code(kind):
    torch.manual_seed(0)
    p = 3
    model = create_method("vpt_shallow", make_tiny_convnet(kind), num_classes=4, prompt_length=p).eval()
    prompt = model.pixel_prompt
    assert tuple(prompt.prompt_embeddings_tb.shape) == (1, 3, 2 * p, 32 + 2 * p)
    assert tuple(prompt.prompt_embeddings_lr.shape) == (1, 3, 32, 2 * p)
    images = torch.randn(2, 3, 32, 32)
    seen, logits = first_conv_input(model, images)
    expected = reference_pad(images, prompt.prompt_embeddings_tb.detach(), prompt.prompt_embeddings_lr.detach(), p,
                             IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(seen, expected, rtol=0, atol=1e-6)
    backbone = model.backbone
    with torch.no_grad():
        torch.testing.assert_close(logits, backbone.forward_head(backbone.forward_features(expected)), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_are_normalised_with_the_backbones_data_config(kind):
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.2, 0.1)
    backbone = make_tiny_convnet(kind, pretrained_cfg_overlay={**CONV_32PX, "mean": mean, "std": std})
    model = create_method("vpt_shallow", backbone, num_classes=3, prompt_length=2).eval()
    with torch.no_grad():
        model.pixel_prompt.prompt_embeddings_tb.fill_(0.5)
        model.pixel_prompt.prompt_embeddings_lr.fill_(1.0)
    seen, _ = first_conv_input(model, torch.zeros(1, 3, 32, 32))
    for c in range(3):
        assert seen[0, c, 0, 0].item() == pytest.approx((0.5 - mean[c]) / std[c])  # top band
        assert seen[0, c, 10, 0].item() == pytest.approx((1.0 - mean[c]) / std[c])  # left band


def test_imagenet_checkpoints_normalise_with_imagenet_statistics():
    model = create_method("vpt_shallow", make_tiny_convnet("resnet"), num_classes=3)
    assert model.pixel_prompt.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert model.pixel_prompt.std.flatten().tolist() == pytest.approx(IMAGENET_STD)


@pytest.mark.parametrize("location", ["pad", "below"])
def test_prompt_init_is_uniform_in_0_1(location):
    torch.manual_seed(0)
    model = create_method("vpt_shallow", make_tiny_convnet("convnext"), num_classes=3, prompt_length=12,
                          location=location)
    values = torch.cat([p.detach().flatten() for p in model.pixel_prompt.parameters()])
    assert values.numel() == (pad_count(12, 32) if location == "pad" else 12 * 32 * 32) > 6_000
    assert values.min() >= 0 and values.max() <= 1
    assert values.min() < 0.01 and values.max() > 0.99
    assert values.mean().item() == pytest.approx(0.5, abs=0.02)
    assert values.std().item() == pytest.approx(1 / math.sqrt(12), rel=0.03)  # uniform(0, 1)


def test_default_is_pad_with_the_official_5_pixels():
    model = create_method("vpt_shallow", make_tiny_convnet("resnet"), num_classes=3)
    assert model.pixel_prompt.pixels == 5
    assert tuple(model.pixel_prompt.prompt_embeddings_tb.shape) == (1, 3, 10, 42)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("location", ["pad", "below"])
def test_only_the_prompt_the_stem_for_below_and_the_head_train(kind, location):
    torch.manual_seed(0)
    model = create_method("vpt_shallow", make_tiny_convnet(kind), num_classes=3, prompt_length=2, location=location)
    stem = {"resnet": ["conv1.weight", "bn1.weight", "bn1.bias"],
            "convnext": ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]}[kind]
    head = "fc" if kind == "resnet" else "head.fc"
    expected = {f"backbone.{head}.weight", f"backbone.{head}.bias"}
    if location == "pad":
        expected |= {"pixel_prompt.prompt_embeddings_tb", "pixel_prompt.prompt_embeddings_lr"}
    else:
        expected |= {"pixel_prompt.prompt_embeddings", *(f"backbone.{n}" for n in stem)}
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert tuned == expected
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.backbone.layer1.training if kind == "resnet" else not model.backbone.stages.training
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    for _ in range(2):
        optimizer.zero_grad()
        model.criterion(model(images), labels).backward()
        optimizer.step()
    moved = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if not torch.equal(t, before[n])}
    assert moved == expected  # BatchNorm statistics included: the backbone stays in eval mode


@pytest.mark.parametrize("kind", KINDS)
def test_below_adds_normalised_channels_and_extends_the_first_conv(kind):
    torch.manual_seed(0)
    p = 4
    backbone = make_tiny_convnet(kind)
    name = backbone.pretrained_cfg["first_conv"]
    old = backbone.get_submodule(name)
    if old.bias is not None:  # timm initialises ConvNeXt's stem bias to 0; a pretrained one is not
        with torch.no_grad():
            old.bias.normal_()
    old_weight, old_bias = old.weight.detach().clone(), None if old.bias is None else old.bias.detach().clone()
    model = create_method("vpt_shallow", backbone, num_classes=3, prompt_length=p, location="below").eval()
    conv = model.backbone.get_submodule(name)
    assert conv.in_channels == 3 + p and conv.out_channels == old.out_channels
    assert (conv.kernel_size, conv.stride, conv.padding) == (old.kernel_size, old.stride, old.padding)
    torch.testing.assert_close(conv.weight[:, :3].detach(), old_weight, rtol=0, atol=0)
    if old_bias is not None:  # ours: ConvNeXt's stem keeps its pretrained bias
        torch.testing.assert_close(conv.bias.detach(), old_bias, rtol=0, atol=0)
    new = conv.weight[:, 3:].detach()
    if kind == "resnet":  # official: Xavier-uniform over the whole (3 + p)-channel weight
        fan_in, fan_out = (3 + p) * conv.kernel_size[0] ** 2, conv.out_channels * conv.kernel_size[0] ** 2
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert new.abs().max() <= bound and new.abs().max() > 0.95 * bound
    else:  # official ConvNeXt setup: trunc-normal, std 0.02
        assert new.std().item() == pytest.approx(0.02, rel=0.15)
    prompt = model.pixel_prompt.prompt_embeddings.detach()
    assert tuple(prompt.shape) == (1, p, 32, 32)
    images = torch.randn(2, 3, 32, 32)
    seen, _ = first_conv_input(model, images)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # official: the channel average, repeated
    expected = torch.cat([images, ((prompt - mean) / std).expand(2, -1, -1, -1)], dim=1)
    torch.testing.assert_close(seen, expected, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_prompt_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_method("vpt_shallow", make_tiny_convnet("convnext"), num_classes=3, prompt_length=2)
        model.backbone.set_grad_checkpointing(checkpointing)
        model.train()
        model.criterion(model(torch.ones(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
        grads.append(model.pixel_prompt.prompt_embeddings_tb.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# --- the official count ---------------------------------------------------------------------------------------
def test_resnet50_pad_prompt_count_is_the_official_one():
    p, size, width, classes = 5, 224, 2048, 200  # the VPT code's NUM_TOKENS default, its 224 crop, CUB-200
    head = width * classes + classes
    assert pad_count(p, size) == 12 * p * size + 12 * p * p == 13_740
    table = count_params("resnet50", classes, methods=["vpt_shallow", "linear"]).set_index("method")
    assert table.loc["vpt_shallow", "tuned_params"] == pad_count(p, size) + head == 423_540
    assert table.loc["vpt_shallow", "total_params"] == table.loc["linear", "total_params"] + pad_count(p, size)
    below = count_params("resnet50", classes, methods=["vpt_shallow"], given=[("location", "below")])
    # p channels of S x S, the whole 7x7 conv1 over 3 + p channels, bn1's affine, the head
    assert below["tuned_params"][0] == p * size * size + 64 * (3 + p) * 49 + 2 * 64 + head


def test_convnext_base_pad_prompt_count():
    table = count_params("convnext_base", 200, methods=["vpt_shallow"], given=[("prompt_length", 5)])
    assert table["tuned_params"][0] == pad_count(5, 224) + 1024 * 200 + 200


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "options", "message"), [
    (lambda: make_tiny_convnet("resnet"), {"location": "sideways"}, "VPT location must be one of prepend, pad, below"),
    (lambda: make_tiny_convnet("resnet"), {"location": "prepend"}, "use location=pad or below"),
    (lambda: make_tiny_convnet("convnext"), {"prompt_dropout": 0.1}, "a ConvNet's pixel prompt has none"),
    (make_tiny_vit, {"location": "pad"}, "on a ViT prompts are prepended tokens"),
    (lambda: make_tiny_convnet("resnet"), {"prompt_length": 0}, "prompt_length must be a positive integer"),
])
def test_bad_options_give_one_line(build, options, message):
    with pytest.raises(ValueError) as err:
        create_method("vpt_shallow", build(), num_classes=3, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_images_of_another_size_are_refused():
    model = create_method("vpt_shallow", make_tiny_convnet("resnet"), num_classes=3)
    with pytest.raises(ValueError, match=r"built for 32x32 images .* got \(48, 48\)"):
        model(torch.randn(1, 3, 48, 48))


def test_a_224_px_convnet_sizes_its_prompt_from_the_data_config():
    with torch.device("meta"):
        model = create_method("vpt_shallow", create_backbone("resnet18"), num_classes=3, prompt_length=1)
    assert tuple(model.pixel_prompt.prompt_embeddings_lr.shape) == (1, 3, 224, 2)
