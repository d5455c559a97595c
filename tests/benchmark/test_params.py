"""benchmark.params: exact counts on ViT-B/16 with 200 classes, the paper's six and the extra three by formula."""

from __future__ import annotations

import pytest

from benchmark.params import count_params, main
from methods import list_methods

D, C, DEPTH = 768, 200, 12  # ViT-B/16 width and depth; CUB-200's classes
HEAD = D * C + C
BLOCK = 2 * (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)  # norms, qkv, proj, mlp

# The paper setting, P=50 prompts and adapter reduction 8: tuned parameters, head included.
PAPER_COUNTS = {"full": 85_952_456, "linear": 153_800, "bias": 256_712, "vpt_shallow": 192_200, "vpt_deep": 614_600,
                "adapter": 1_933_640}


def partial(k: int) -> int:
    return k * BLOCK + 2 * D + HEAD  # k blocks + final norm + head


def lora(rank: int) -> int:
    return DEPTH * 2 * rank * (D + D) + HEAD  # targets=qv: A (r, D) and B (D, r) for the q and for the v rows of qkv


def mlp(k: int) -> int:
    return (k - 1) * (D * D + D + 2 * D) + HEAD  # hidden Linear(D, D) + LayerNorm(D) each, then Linear(D, C)


@pytest.fixture(scope="module")
def vit_b_counts():
    table = count_params("vit_base_patch16_224", C, methods=[*PAPER_COUNTS, "partial_k", "lora", "mlp_k"],
                         given=[("prompt_length", 50), ("reduction", 8)])  # the methods pinned below
    return table.set_index("method")


def test_paper_six_match_the_paper_setting(vit_b_counts):
    assert {m: vit_b_counts.loc[m, "tuned_params"] for m in PAPER_COUNTS} == PAPER_COUNTS
    assert vit_b_counts.loc["full", "total_params"] == 85_952_456


def test_extra_methods_follow_their_formulas(vit_b_counts):
    assert vit_b_counts.loc["partial_k", "tuned_params"] == partial(1) == 7_243_208
    assert vit_b_counts.loc["lora", "tuned_params"] == lora(8) == 12 * 2 * 8 * (768 + 768) + HEAD  # 294,912 + head
    assert vit_b_counts.loc["mlp_k", "tuned_params"] == mlp(3)
    # added parameters show in the total; re-enabled ones do not
    assert vit_b_counts.loc["lora", "total_params"] == 85_952_456 + lora(8) - HEAD
    assert vit_b_counts.loc["partial_k", "total_params"] == 85_952_456


def test_flags_reach_their_methods():
    table = count_params("vit_base_patch16_224", C, methods=["partial_k", "lora", "mlp_k", "vpt_deep", "adapter"],
                         given=[("partial_k.k", 2), ("rank", 4), ("mlp_k.k", 2), ("prompt_length", 10),
                                ("reduction", 16)])
    tuned = table.set_index("method")["tuned_params"].to_dict()
    assert tuned == {"partial_k": partial(2), "lora": lora(4), "mlp_k": mlp(2), "vpt_deep": DEPTH * 10 * D + HEAD,
                     "adapter": DEPTH * (D * 48 + 48 + 48 * D + D) + HEAD}


def test_cli_csv_lists_every_registered_method(capsys):
    assert main(["--backbone", "vit_embedded_p7_28", "--num-classes", "10", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "method,tuned_params,total_params,tuned_percent"
    assert [line.split(",")[0] for line in lines[1:]] == list_methods()
    assert "linear,1290," in lines[2]  # 128 * 10 + 10


def test_cli_rejects_bad_input_with_the_fix(capsys):
    assert main(["--backbone", "vit_embedded_p7_28", "--num-classes", "10", "--method-args", "partial_k.k=7"]) == 2
    assert "choose k in 1..6" in capsys.readouterr().err
    assert main(["--backbone", "efficientnet_b0", "--num-classes", "10"]) == 2
    assert "timm EfficientNet, which no tuning method supports" in capsys.readouterr().err


def test_docs_support_matrix_is_the_codes(capsys):
    from benchmark.core.config import REPO_ROOT
    from benchmark.params import support_markdown

    text = (REPO_ROOT / "docs" / "backbones.md").read_text()
    shown = text.split("<!-- support-matrix:start -->\n")[1].split("<!-- support-matrix:end -->")[0]
    assert shown == support_markdown(), "regenerate it: python -m benchmark.params --support-matrix"
    assert main(["--support-matrix"]) == 0 and capsys.readouterr().out == shown
    lines = shown.splitlines()
    assert lines[0] == "| Method | vit | swin | convnet |" and len(lines) == 2 + len(list_methods())
    assert "| `full` (Full) | ✓ |" in shown


def test_params_counts_the_methods_of_the_backbones_family(capsys):
    from methods import get_method_class

    assert main(["--backbone", "resnet18", "--num-classes", "10", "--csv"]) == 0
    counted = [line.split(",")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert counted == [m for m in list_methods() if "convnet" in get_method_class(m).families]
    assert "linear" in counted and "vpt_deep" not in counted
    assert main(["--backbone", "resnet18", "--num-classes", "10", "--methods", "lora"]) == 2  # named: must support it
    assert "does not support convnet backbones" in capsys.readouterr().err
