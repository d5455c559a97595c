"""SCT against computations written out here: the salient channels (per class the L2 norm of norm2's input over
its images and patch tokens, the mean over classes, the K largest) from a hand-run pretrained forward, the adapted
block x'[S] += W x'[S] + b, the selection run by a real Trainer before the first step, and the ViT-B/16 count."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from methods import create_method
from methods.sct import salient_channels
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, embed, vit_b_tuned

K = 5


def test_vit_b_count_is_the_papers():
    tuned = vit_b_tuned("sct")
    assert tuned == DEPTH * (96 * 96 + 96) + HEAD == 265_544
    assert tuned - HEAD == 111_744
    # The paper's figure at its default K = 96 (1/8 of 768 channels): "adding only 0.11M parameters of the ViT-B"
    # (Zhao et al., SCT, abstract of arXiv:2309.08513v5, read at https://arxiv.org/html/2309.08513v5), in M to 2 places.
    assert round((tuned - HEAD) / 1e6, 2) == 0.11


def data(n: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 2, 0, 2, 2, 0, 2])[:n])


def reference_channels(plain, dataset: TensorDataset, k: int) -> list[list[int]]:
    """Per block: norm2's input over the patch tokens, per class sqrt(sum x^2) per channel, mean over classes."""
    images, labels = dataset.tensors
    with torch.no_grad():
        x, inputs = embed(plain, images), []
        for block in plain.blocks:
            x = x + block.attn(block.norm1(x))
            inputs.append(x[:, 1:].numpy())
            x = x + block.mlp(block.norm2(x))
    chosen = []
    for feature in inputs:
        per_class = [np.sqrt((feature[labels.numpy() == c] ** 2).sum(axis=(0, 1))) for c in np.unique(labels)]
        score = np.mean(per_class, axis=0)
        chosen.append(sorted(np.argsort(score)[::-1][:k].tolist()))
    return chosen


def built(k: int = K):
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    with torch.no_grad():  # a CLS token loud in channel 0: counted with the patch tokens, it would make 0 salient
        plain.cls_token[..., 0] = 50.0
        for block in plain.blocks:  # a loud attention branch: norm2's input (after it) ranks unlike norm1's
            block.attn.proj.weight.mul_(30.0)
    return create_method("sct", copy.deepcopy(plain), num_classes=3, channels=k), plain


def test_selection_is_the_hand_computed_salient_channels():
    model, plain = built()
    for block in model.backbone.blocks:  # maps this large would move the statistics, were they measured with them
        block.sct.adapt_linear.weight.data.normal_(0, 3)
    model.select_from_data(DataLoader(data(), batch_size=3))  # batches of 3, 3, 1: sums over all of them
    expected = reference_channels(plain, data(), K)
    assert [block.sct.channels.tolist() for block in model.backbone.blocks] == expected
    assert all(block.sct.active for block in model.backbone.blocks)


def test_adapter_init_and_the_adapted_block(tiny_batch):
    model, plain = built()
    model.select_from_data(DataLoader(data(), batch_size=4))
    for block in model.backbone.blocks:
        linear = block.sct.adapt_linear
        assert linear.weight.shape == (K, K) and 0 < linear.weight.std() < 0.03
        assert torch.equal(linear.bias, torch.zeros(K))
        with torch.no_grad():
            linear.bias.normal_()  # a nonzero bias shows where it is added
    model.eval()
    images = tiny_batch[0]
    with torch.no_grad():
        x = embed(model.backbone, images)
        for block in model.backbone.blocks:
            x = x + block.attn(block.norm1(x))
            chosen = block.sct.channels
            x = x.clone()
            x[..., chosen] = x[..., chosen] + x[..., chosen] @ block.sct.adapt_linear.weight.T \
                + block.sct.adapt_linear.bias
            x = x + block.mlp(block.norm2(x))
        expected = model.backbone.head(model.backbone.norm(x)[:, 0])
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)



def test_the_adapted_block_runs_under_bf16_autocast(tiny_batch):
    """bf16-mixed (`make bench PRECISION=bf16-mixed`, gpu-check): the linear's bf16 update joins the fp32 stream."""
    model, _ = built()
    model.select_from_data(DataLoader(data(), batch_size=4))
    model.eval()
    with torch.no_grad():
        full = model(tiny_batch[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(tiny_batch[0])
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)


def test_a_trainer_selects_once_before_the_first_step():
    model, plain = built()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(data(), batch_size=4))
    assert bool(model.selected)
    assert [block.sct.channels.tolist() for block in model.backbone.blocks] == reference_channels(plain, data(), K)
    for block in model.backbone.blocks:  # a saved selection, as a rebuilt or resumed model loads it
        block.sct.channels.copy_(torch.arange(K))
    model.on_train_start()  # is kept: no second selection
    assert all(block.sct.channels.tolist() == list(range(K)) for block in model.backbone.blocks)


def test_more_channels_than_the_width_are_refused():
    with pytest.raises(ValueError, match="exceeds the block width 32"):
        create_method("sct", make_tiny_vit(), num_classes=3, channels=33)


def test_scores_are_the_mean_over_classes_of_each_class_norm():
    sum_squares = torch.tensor([[36.0, 0.0, 16.0], [0.0, 0.0, 0.0], [0.0, 25.0, 16.0]])  # class 1 holds no image
    # norms (6, 0, 4) and (0, 5, 4): mean (3, 2.5, 4); one norm over all images would rank channel 0 first
    assert salient_channels(sum_squares, torch.tensor([2, 0, 1]), 1).tolist() == [2]
    assert salient_channels(sum_squares, torch.tensor([2, 0, 1]), 2).tolist() == [0, 2]
