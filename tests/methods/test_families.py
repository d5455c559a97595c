"""Backbone families: which a built timm model belongs to, and every method refusing the families it does not
declare, on the meta device (nothing allocated), with a message naming what it supports."""

from __future__ import annotations

import pytest
import timm
import torch

from backbones import FAMILIES, family_of
from methods import create_method, get_method_class, list_methods
from methods.base import UnsupportedBackbone
from methods.registry import methods_for_family, support_matrix
from tests.helpers.models import TINY_BACKBONES, TINY_METHOD_OPTIONS, make_tiny


@pytest.mark.parametrize(("name", "family"), [
    ("vit_tiny_patch16_224", "vit"), ("vit_embedded_p7_28", "vit"), ("deit_tiny_patch16_224", "vit"),
    ("swin_tiny_patch4_window7_224", "swin"), ("resnet18", "convnet"), ("convnext_atto", "convnet"),
    ("efficientnet_b0", None), ("mobilenetv3_small_100", None),
])
def test_family_of_a_timm_model(name, family):  # importing backbones registered the embedded ViT with timm
    with torch.device("meta"):
        assert getattr(family_of(timm.create_model(name, pretrained=False)), "name", None) == family


def test_the_tiny_backbones_cover_every_family():
    assert set(TINY_BACKBONES) == set(FAMILIES)
    for family in FAMILIES:
        with torch.device("meta"):
            assert family_of(make_tiny(family)) is FAMILIES[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_methods_refuse_the_families_they_do_not_declare(family):
    for method in list_methods():
        families = get_method_class(method).families
        assert families and set(families) <= set(FAMILIES), method
        if family in families:  # builds on every family it declares
            with torch.device("meta"):
                create_method(method, make_tiny(family), num_classes=3, **TINY_METHOD_OPTIONS.get((method, family), {}))
            continue
        with torch.device("meta"), pytest.raises(UnsupportedBackbone) as err:
            create_method(method, make_tiny(family), num_classes=3)
        assert f"Method {method!r} does not support {family} backbones" in str(err.value)
        assert f"it supports: {', '.join(families)}." in str(err.value)


def test_support_matrix_and_methods_per_family_read_the_class_facts():
    matrix = support_matrix()
    assert set(matrix) == set(list_methods())
    for family in FAMILIES:
        assert methods_for_family(family) == [m for m in list_methods() if family in get_method_class(m).families]
    assert {m for m, families in matrix.items() if "vit" in families} == set(list_methods())  # every method: ViTs
