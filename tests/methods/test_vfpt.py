"""VFPT against VPT-deep: the same prompts with the first floor(alpha * p) of each layer replaced by the real part of
their 2-D DFT (over hidden and prompt axes, numpy's fft2 here), and VPT-deep's count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, D, vit_b_tuned


def test_vit_b_count_is_vpt_deeps():
    assert vit_b_tuned("vfpt", prompt_length=10) == DEPTH * 10 * D + HEAD == 245_960
    assert vit_b_tuned("vfpt", prompt_length=10) == vit_b_tuned("vpt_deep", prompt_length=10)


@pytest.mark.parametrize(("share", "m"), [(0.5, 2), (1.0, 5), (0.0, 0), (0.39, 1)])
def test_the_first_floor_alpha_p_prompts_take_the_real_2d_dft(share, m):
    torch.manual_seed(0)
    model = create_method("vfpt", make_tiny_vit(), num_classes=3, prompt_length=5, fourier_share=share).eval()
    raw = model.vpt_prompts[1]  # (p, D)
    got = model.prompts_for(1, batch=2)[0].detach().numpy()
    expected = raw.detach().numpy().copy()
    if m:
        expected[:m] = np.fft.fft2(expected[:m]).real
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_logits_are_vpt_deeps_on_the_transformed_prompts(tiny_batch):
    torch.manual_seed(0)
    vfpt = create_method("vfpt", make_tiny_vit(), num_classes=3, prompt_length=4).eval()
    vpt = create_method("vpt_deep", make_tiny_vit(), num_classes=3, prompt_length=4).eval()
    vpt.load_state_dict(vfpt.state_dict())
    with torch.no_grad():
        for layer in range(len(vpt.vpt_prompts)):
            vpt.vpt_prompts[layer, :2] = torch.from_numpy(np.fft.fft2(vfpt.vpt_prompts[layer, :2].numpy()).real)
        torch.testing.assert_close(vfpt(tiny_batch[0]), vpt(tiny_batch[0]), rtol=1e-5, atol=1e-5)


def test_bad_share_gets_one_line():
    with pytest.raises(ValueError) as err:
        create_method("vfpt", make_tiny_vit(), num_classes=3, fourier_share=1.5)
    assert str(err.value) == "vfpt fourier_share must be a number in [0, 1], got 1.5."
