"""Backbones: timm models by name or from a local weights file, the self-supervised and CLIP checkpoints, the
suite's embedded ViT (registered with timm), and one row per backbone family (`FAMILIES`: how to recognise a built
model, its blocks, widths and the layers a tuner targets). Imports torch and timm only; methods/ and benchmark/
build on it."""

from backbones import embedded  # noqa: F401 — registers vit_embedded_p7_28 with timm
from backbones.create import create_backbone, data_config
from backbones.families import FAMILIES, Family, family_of, family_table, fixed_patch_grid
from backbones.hints import closest_name
from backbones.ssl_vits import not_on_hub
from backbones.weights import classifier_prefix, load_weights

__all__ = ["FAMILIES", "Family", "classifier_prefix", "closest_name", "create_backbone", "data_config",
           "family_of", "family_table", "fixed_patch_grid", "load_weights", "not_on_hub"]
