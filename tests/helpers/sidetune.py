"""The VPT code's side network by formula (github.com/KMnP/vpt, src/models/vit_models.py `setup_side`)."""

# torchvision AlexNet `features`: (in, out, kernel) of its five convolutions, each with a bias.
ALEXNET_CONVS = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
ALEXNET_FEATURES = sum(i * o * k * k + o for i, o, k in ALEXNET_CONVS)
SIDE_OUT = 256 * 6 * 6  # the VPT code's Linear(9216, feat_dim): 256 maps pooled to 6 x 6


def sidetune_count(dim: int, classes: int) -> int:
    """AlexNet features + bias-free projection 9216 -> D + scalar alpha + head."""
    return ALEXNET_FEATURES + SIDE_OUT * dim + 1 + dim * classes + classes
