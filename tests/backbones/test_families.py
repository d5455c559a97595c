"""The family table (backbones/families.py): each row recognises its models, lists their blocks in forward order
with their widths, and targets exactly the blocks' attention and MLP linears; docs/backbones.md shows the rows."""

from __future__ import annotations

import re

import pytest
import torch
from timm.models.swin_transformer import PatchMerging
from torch import nn

from backbones import FAMILIES, family_of, family_table
from tests.helpers.models import make_tiny, make_tiny_convnet


def built(family: str) -> nn.Module:
    with torch.device("meta"):
        return make_tiny(family)


def names_of(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(module)] for module in modules]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_tiny_backbone_is_of_exactly_its_row(family):
    model = built(family)
    assert family_of(model) is FAMILIES[family]
    assert [name for name, row in FAMILIES.items() if row.matches(model)] == [family]


def test_blocks_in_forward_order_with_their_widths():
    vit, swin = built("vit"), built("swin")
    assert names_of(vit, FAMILIES["vit"].blocks(vit)) == ["blocks.0", "blocks.1"]
    assert [FAMILIES["vit"].width_of(b) for b in FAMILIES["vit"].blocks(vit)] == [32, 32]
    blocks = FAMILIES["swin"].blocks(swin)
    assert names_of(swin, blocks) == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                      "layers.1.blocks.1"]  # stage by stage, as the forward runs them
    assert [FAMILIES["swin"].width_of(b) for b in blocks] == [24, 24, 48, 48]  # the width doubles at the merge
    assert FAMILIES["swin"].plain_blocks(swin, "test") == blocks


def test_a_swins_merges_lie_between_its_stages_blocks():
    swin = built("swin")
    parts = FAMILIES["swin"].blocks_and_merges(swin)
    assert [kind for kind, _ in parts] == ["merge", "block", "block", "merge", "block", "block"]
    assert isinstance(parts[0][1], nn.Identity) and isinstance(parts[3][1], PatchMerging)  # stage 0 merges nothing
    vit = built("vit")
    assert [kind for kind, _ in FAMILIES["vit"].blocks_and_merges(vit)] == ["block", "block"]


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_a_convnets_stages_and_blocks(kind):
    with torch.device("meta"):
        model = make_tiny_convnet(kind)
    row = family_of(model)
    assert row is FAMILIES["convnet"]
    stages = names_of(model, row.stages(model))
    assert stages == (["stages.0", "stages.1", "stages.2", "stages.3"] if kind == "convnext"
                      else ["layer1", "layer2", "layer3", "layer4"])
    assert len(row.blocks(model)) == 4  # one block per stage in the tiny ConvNets
    assert names_of(model, row.after_blocks_of(model)) == (["norm_pre", "head.norm"] if kind == "convnext" else [])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_targets_are_exactly_the_blocks_linears_never_the_patch_projection(family):
    model, row = built(family), FAMILIES[family]
    prefixes = names_of(model, row.blocks(model))

    def matched(pattern: str) -> list[str]:
        return [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]

    attention = matched(row.targets(*row.attention_layers))
    assert attention == [f"{p}.attn.{layer}" for p in prefixes for layer in ("qkv", "proj")]
    everything = matched(row.targets(*row.attention_layers, *row.mlp_layers))
    assert everything == [f"{p}.{layer}" for p in prefixes for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(type(model.get_submodule(name)) is nn.Linear for name in everything)
    assert "patch_embed.proj" in matched(r".*\.(?:qkv|proj)")  # what a bare target list would also adapt: a Conv2d
    assert matched(row.targets(row.mlp_layers[-1])) == [f"{p}.mlp.fc2" for p in prefixes]


def test_plain_blocks_refuse_a_block_of_another_class():
    vit = built("vit")

    class OtherBlock(type(vit.blocks[1])):
        pass

    vit.blocks[1].__class__ = OtherBlock
    with pytest.raises(ValueError, match=r"houlsby needs timm's plain Block; blocks\[1\] is OtherBlock"):
        FAMILIES["vit"].plain_blocks(vit, "houlsby")
    with pytest.raises(ValueError, match="the convnet family has none"):
        FAMILIES["convnet"].plain_blocks(built("convnet"), "houlsby")


def test_after_the_blocks_lists_what_the_model_has():
    vit = built("vit")  # timm's ViT: norm, fc_norm (Identity with CLS pooling), attn_pool None (absent)
    assert names_of(vit, FAMILIES["vit"].after_blocks_of(vit)) == ["norm", "fc_norm"]
    swin = built("swin")
    assert names_of(swin, FAMILIES["swin"].after_blocks_of(swin)) == ["norm"]


def test_docs_show_the_current_family_table(capsys):
    from benchmark.core.config import REPO_ROOT
    from benchmark.params import main

    text = (REPO_ROOT / "docs" / "backbones.md").read_text()
    shown = text.split("<!-- family-table:start -->\n")[1].split("<!-- family-table:end -->")[0]
    assert shown == family_table(), "regenerate it: python -m benchmark.params --family-table"
    assert main(["--family-table"]) == 0 and capsys.readouterr().out == shown
    assert shown.splitlines()[0] == "| Row | " + " | ".join(f"`{name}`" for name in FAMILIES) + " |"
