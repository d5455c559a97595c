"""Partial-k fine-tuning: the last k blocks, the final norm and the head train (Yosinski et al., 2014,
https://arxiv.org/abs/1411.1792; the PARTIAL-1 row of VPT's Table 1, Jia et al., 2022, https://arxiv.org/abs/2203.12119).

Everything after the last k blocks trains too: the final `norm`, timm's `fc_norm` (for mean-pooled
backbones) and an attention-pooling head (`attn_pool`, MAP backbones), since each sits between the tuned
blocks and the classifier. The frozen early blocks cost no autograd: nothing before them requires grad, so
autograd records nothing until the first tuned block.

On a Swin the k blocks are counted across stages from the end (the last block of the last stage is block 1), and
every patch merge after the first tuned block trains with them, then the final norm: the VPT code's Swin
partial-1 (the last block + norm), partial-2 (the last stage) and partial-4 (the last stage, the two blocks before
it and the merge between them) are k = 1, 2, 4 on Swin-B.

On a ConvNet k counts stages, as the VPT code's ResNet "partial-k" does (src/models/resnet.py: partial-1 tunes
layer4, partial-2 layer3-4, partial-3 layer2-4, each with its downsampling): timm ResNet's `layer1..layer4`,
ConvNeXt's `stages` (a timm stage holds its downsampling layer, the VPT code's `downsample_layers[i]`) plus the
head norm that follows them (the VPT code's ConvNeXt `tune_norm`). Its ConvNeXt defines only "partial-0", the last
block; stages are ours, the same unit for both ConvNets.
"""

from dataclasses import dataclass

from methods.base import TuningModule
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class PartialOptions(Options):
    method = "partial_k"
    # k up to the backbone's depth is checked in adapt(), which has the backbone
    k: int = option(1, "how many of the last blocks (ViT) or stages (ConvNet) train (paper: Partial-1)", kind=int,
                    low=1, hint="blocks to tune; k=0 is the linear probe: use method 'linear'")


@register_method("partial_k")
class PartialFineTuning(TuningModule):
    label, color, paper_row = "Partial-k", "#bcbd22", 2
    options_cls = PartialOptions
    families = ("vit", "swin", "convnet")

    def adapt(self) -> None:
        backbone, family = self.backbone, self.family
        # k counts stages on a ConvNet (the VPT code's ResNet partial-k) and blocks on a transformer (its ViT and Swin
        # partial-k): the unit of depth differs per family, so this stays a branch
        convnet = family.name == "convnet"
        units, unit = (family.stages(backbone), "stages") if convnet else (family.blocks(backbone), "blocks")
        depth = len(units)
        if self.options.k > depth:
            raise ValueError(f"partial_k k={self.options.k} exceeds the backbone's {depth} {unit}; choose k in "
                             f"1..{depth} (k={depth} tunes every {unit[:-1]} but leaves the "
                             f"{'stem' if convnet else 'embeddings'} frozen; method 'full' tunes everything).")
        tuned = units[depth - self.options.k:]
        for unit_module in tuned:
            unit_module.requires_grad_(True)
        after_first_tuned = False  # a merge (a Swin's patch merge) after the first tuned block lies between tuned ones
        for kind, module in family.blocks_and_merges(backbone):
            after_first_tuned = after_first_tuned or module is tuned[0]
            if kind == "merge" and after_first_tuned:
                module.requires_grad_(True)  # timm's Identity at a Swin's stage 0: no parameters
        for module in family.after_blocks_of(backbone):  # the final norm(s) and pooling: nn.Identity when unused
            module.requires_grad_(True)
