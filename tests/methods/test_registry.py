"""Each method owns its label, colour and place in the paper; the report and the grid read them from the registry."""

from __future__ import annotations

from benchmark.sweeps.spec import PAPER_METHODS
from methods import get_method_class, list_methods
from methods.registry import color, fig3_methods, label, table_order

# VPT (Jia et al., ECCV 2022) Table 1, top to bottom.
TABLE_1_ROWS = ["full", "linear", "partial_k", "mlp_k", "sidetune", "bias", "adapter", "vpt_shallow", "vpt_deep"]
ADAPTER_FAMILY = ["adaptformer", "houlsby", "convpass", "repadapter"]  # issue 16, in registration order
PEFT = ["dora", "ia3", "loha", "lokr", "vera", "boft", "fourierft"]  # methods/peft_tuners.py, registration order
FIG3 = ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"]  # the paper's Fig. 3 legend
# issue 16's scale/shift and factor methods, registered after lora (methods/__init__.py), with their labels
SCALES = {"ln_tune": "LN-tune", "ssf": "SSF", "difffit": "DiffFit", "fact_tt": "FacT-TT", "fact_tk": "FacT-TK"}


def test_table_order_is_the_papers_rows_then_the_rest_then_unknown_names():
    assert table_order(list_methods()) == TABLE_1_ROWS + ["lora", *ADAPTER_FAMILY, *SCALES, "vqt", *PEFT]
    assert table_order(["old_method", "vpt_deep", "a_method", "full"]) == ["full", "vpt_deep", "a_method", "old_method"]


def test_fig3_methods_are_the_papers_six_and_the_grids_default():
    assert fig3_methods() == FIG3 and list(PAPER_METHODS) == FIG3


def test_every_method_has_its_own_label_and_colour():
    labels = {m: label(m) for m in list_methods()}
    assert labels == {"full": "Full", "linear": "Linear", "partial_k": "Partial-k", "mlp_k": "MLP-k", "bias": "Bias",
                      "adapter": "Adapter", "vpt_shallow": "VPT-shallow", "vpt_deep": "VPT-deep", "lora": "LoRA",
                      "adaptformer": "AdaptFormer", "houlsby": "Houlsby", "convpass": "Convpass",
                      "repadapter": "RepAdapter", **SCALES, "sidetune": "Sidetune", "vqt": "VQT",
                      "dora": "DoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr", "vera": "VeRA", "boft": "BOFT",
                      "fourierft": "FourierFT"}
    colours = [color(m) for m in list_methods()]
    assert len(set(colours)) == len(colours) and "#7f7f7f" not in colours  # the fallback grey is for unknown names
    assert color("partial_k") == get_method_class("partial_k").color != color("no_such_method") == "#7f7f7f"
    assert label("no_such_method") == "no_such_method"
