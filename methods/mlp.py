"""MLP-k: the frozen backbone with a k-layer MLP as classification head instead of a linear layer
(the MLP-3 row of VPT's Table 1, Jia et al., 2022, https://arxiv.org/abs/2203.12119).

The head follows the VPT code's `MLP`: k - 1 hidden layers of the embedding width D, each
    Linear(D, D) -> ReLU -> norm(D) -> Dropout(0.1)
then Linear(D, num_classes); hidden weights Kaiming-normal (fan_out). Two changes from the VPT code:
- the norm is a LayerNorm where the VPT code has BatchNorm1d. BatchNorm fails on a training batch of one (the
  loaders keep the last partial batch, and small data fractions make small batches) and is noisy on few-shot
  batches; LayerNorm has the same 2·D parameters, so the counts equal the VPT code's.
- the last layer's init is the run's `head_init`, as for the linear probe's head: the paper recipe's "vpt" is the
  VPT code's Kaiming-normal (fan_out), which gives logits of std ~ sqrt(2·D / C); the quick recipe's "pytorch"
  keeps nn.Linear's. Measured on digits (10 classes, the suite's first 1-epoch embedded weights, SGD lr 0.1), the
  VPT init gave first-epoch loss 9.2 instead of 2.4 and test top-1 27.7% instead of 43.8%.
k counts every linear layer, as the paper's "MLP with k layers"; the VPT code's MODEL.MLP_NUM counts the hidden
ones (MLP_NUM = k - 1). k = 1 is the linear probe's head.

On a ConvNet the MLP replaces the classifier after the pooling (ResNet's `fc`, ConvNeXt's `head.fc`, after its
head norm), with the pooled width as D (the VPT code's ResNet/ConvNeXt heads: MLP_NUM hidden layers of out_dim).

The backbone is the linear probe's: eval mode, `torch.inference_mode`, and the same cached pre-logit
features may stand in for it (benchmark/core/features.py).
"""

from dataclasses import dataclass

from torch import nn

from methods.linear import LinearProbe
from methods.options import Options, option
from methods.registry import register_method


@dataclass
class MLPOptions(Options):
    method = "mlp_k"
    k: int = option(3, "layers in the head, k - 1 of them hidden with the embedding width (paper: MLP-3)", kind=int,
                    low=1, hint="head layers; k=1 is the linear probe")
    dropout: float = option(0.1, "dropout after each hidden layer (VPT code: 0.1)", kind=float, low=0, high=1,
                            high_open=True)


def mlp_head(dim: int, num_classes: int, layers: int, dropout: float) -> nn.Sequential:
    hidden = []
    for _ in range(layers - 1):
        hidden += [nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim), nn.Dropout(dropout)]
    for module in hidden:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out")
    return nn.Sequential(*hidden, nn.Linear(dim, num_classes))


@register_method("mlp_k")
class MLPHeadProbe(LinearProbe):
    label, color, paper_row, in_fig3 = "MLP-k", "#e377c2", 3, False
    options_cls = MLPOptions
    families = ("vit", "swin", "convnet")

    def adapt(self) -> None:
        backbone = self.backbone
        dim = backbone.get_classifier().in_features  # what the pooling (and ConvNeXt's head norm) hands on
        head = mlp_head(dim, self.num_classes, self.options.k, self.options.dropout)
        # in the classifier's place: a ViT's `head`, a Swin's or ConvNeXt's `head.fc` (their head module pools
        # first), a ResNet's `fc`
        name = next(n for n, m in backbone.named_modules() if m is backbone.get_classifier())
        parent, _, attribute = name.rpartition(".")
        setattr(backbone.get_submodule(parent), attribute, head)
