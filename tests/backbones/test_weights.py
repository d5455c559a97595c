"""Local backbone weights: Google .npz, .pth and .safetensors round trips (same outputs after loading), mismatches
that name missing / unexpected keys, and the data config of a backbone built at another size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from backbones import create_backbone, data_config
from benchmark.core.config import RunConfig
from benchmark.core.pipeline import run
from tests.helpers.models import TINY_VIT, make_tiny_vit


def google_npz(model, path: Path) -> Path:
    """Write `model` as an original Google ViT checkpoint (the key names and layouts timm's _load_weights reads)."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    width, heads = model.embed_dim, model.blocks[0].attn.num_heads
    arrays = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (ph, pw, in, D)
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    for i in range(len(model.blocks)):
        block, prefix = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            arrays[f"{prefix}{theirs}/scale"] = state[f"{block}{ours}.weight"]
            arrays[f"{prefix}{theirs}/bias"] = state[f"{block}{ours}.bias"]
        qkv_weight = np.split(state[f"{block}attn.qkv.weight"], 3)  # each (D, D): rows = heads x head_dim
        qkv_bias = np.split(state[f"{block}attn.qkv.bias"], 3)
        for name, weight, bias in zip(("query", "key", "value"), qkv_weight, qkv_bias, strict=True):
            arrays[f"{prefix}MultiHeadDotProductAttention_1/{name}/kernel"] = weight.T.reshape(width, heads, -1)
            arrays[f"{prefix}MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(heads, -1)
        proj = state[f"{block}attn.proj.weight"]  # (D_out, heads x head_dim)
        arrays[f"{prefix}MultiHeadDotProductAttention_1/out/kernel"] = proj.reshape(width, heads, -1).transpose(1, 2, 0)
        arrays[f"{prefix}MultiHeadDotProductAttention_1/out/bias"] = state[f"{block}attn.proj.bias"]
        for r in range(2):
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/kernel"] = state[f"{block}mlp.fc{r + 1}.weight"].T
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/bias"] = state[f"{block}mlp.fc{r + 1}.bias"]
    np.savez(path, **arrays)
    return path


def features(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)  # (B, D): what the head reads


@pytest.fixture
def source_and_images():
    torch.manual_seed(1)
    source = make_tiny_vit()
    return source, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_with(weights: Path, **overrides):
    torch.manual_seed(99)  # another init: only loading can make the outputs equal
    return create_backbone("vit_tiny_patch16_224", weights=weights, **{**TINY_VIT, **overrides})


def test_npz_round_trip(tmp_path, source_and_images):
    source, images = source_and_images
    path = google_npz(source, tmp_path / "ViT-Ti_tiny.npz")
    assert not torch.allclose(features(make_tiny_vit(), images), features(source, images))
    torch.testing.assert_close(features(tiny_with(path), images), features(source, images), rtol=1e-5, atol=1e-5)


def test_safetensors_and_pth_round_trips(tmp_path, source_and_images):
    source, images = source_and_images
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")  # a wrapped training checkpoint
    torch.save(source.state_dict(), tmp_path / "w.pt")
    expected = features(source, images)
    for name in ("w.safetensors", "w.pth", "w.pt"):
        torch.testing.assert_close(features(tiny_with(tmp_path / name), images), expected, rtol=0, atol=0)


def test_npz_with_other_depth_names_missing_and_unexpected_keys(tmp_path, source_and_images):
    path = google_npz(source_and_images[0], tmp_path / "two_blocks.npz")
    with pytest.raises(ValueError, match=r"depth=3; the checkpoint has embed_dim=32, depth=2\): missing keys "
                                         r"\['Transformer/encoderblock_2/...'\], unexpected keys \[\]"):
        tiny_with(path, depth=3)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['Transformer/encoderblock_1/...'\]"):
        tiny_with(path, depth=1)  # timm alone would load block 0 and drop block 1 without a word


def test_npz_with_other_width_is_named(tmp_path, source_and_images):
    path = google_npz(source_and_images[0], tmp_path / "w32.npz")
    with pytest.raises(ValueError, match=r"embed_dim=48, depth=2; the checkpoint has embed_dim=32, depth=2"):
        tiny_with(path, embed_dim=48)


def test_npz_that_is_not_a_vit(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a ViT .npz checkpoint: it has no 'embedding/kernel'"):
        tiny_with(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz checkpoint"):
        tiny_with(tmp_path / "text.npz")


def test_pth_with_other_depth_names_missing_and_unexpected_keys(tmp_path, source_and_images):
    torch.save(source_and_images[0].state_dict(), tmp_path / "two_blocks.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.2.norm1.weight'.*unexpected keys \[\]"):
        tiny_with(tmp_path / "two_blocks.pth", depth=3)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['blocks.1.norm1.weight'"):
        tiny_with(tmp_path / "two_blocks.pth", depth=1)


def test_data_config_follows_the_built_input_size():
    assert data_config(make_tiny_vit())["input_size"] == (3, 32, 32)
    assert data_config(create_backbone("vit_tiny_patch16_224"))["input_size"] == (3, 224, 224)
    assert data_config(create_backbone("vit_embedded_p7_28"))["input_size"] == (1, 28, 28)


def test_run_with_local_npz_weights(tmp_path, source_and_images):
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        for name in ("a", "b"):
            for i in range(count):
                path = tmp_path / "data" / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), color=(200 if name == "a" else 10, 50 * i, 90)).save(path)
    weights = google_npz(source_and_images[0], tmp_path / "tiny.npz")
    cfg = RunConfig(method="linear", dataset="folder", data_root=str(tmp_path / "data"), train_fraction=1.0,
                    backbone="vit_tiny_patch16_224", weights=str(weights), backbone_kwargs=TINY_VIT, epochs=1,
                    warmup_epochs=0, batch_size=2, results_dir=str(tmp_path / "results"))
    result = run(cfg)
    assert result["status"] == "ok" and result["config"]["weights"] == str(weights)
