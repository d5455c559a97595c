"""Each method owns its label, colour and place in the paper; the report and the grid read them from the registry.

What this pins comes from outside the registry: VPT's Table 1 and Fig. 3 and the labels the methods' papers (and
issue 16) give, written below, and which methods exist, read from the `register_method("...")` and
`peft_method("...")` calls in methods/*.py and the rows of methods/peft_table.py (which methods/peft_zoo.py registers)
with `ast`. A new method needs no edit here: it is registered exactly once, with a label and a colour of its own, and
it comes after Table 1's rows in registration order."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmark.sweeps.spec import PAPER_METHODS
from methods import get_method_class, list_methods
from methods.registry import color, fig3_methods, label, table_order

METHODS_DIR = Path(__file__).resolve().parents[2] / "methods"

# VPT (Jia et al., ECCV 2022) Table 1, top to bottom, with the names it gives them.
TABLE_1 = {"full": "Full", "linear": "Linear", "partial_k": "Partial-k", "mlp_k": "MLP-k", "sidetune": "Sidetune",
           "bias": "Bias", "adapter": "Adapter", "vpt_shallow": "VPT-shallow", "vpt_deep": "VPT-deep"}
FIG3 = ["full", "linear", "bias", "adapter", "vpt_shallow", "vpt_deep"]  # the paper's Fig. 3 legend
# Beyond Table 1, each group in its registration order (methods/__init__.py), with its paper's name for each method.
LORA = {"lora": "LoRA"}
ADAPTER_FAMILY = {"adaptformer": "AdaptFormer", "houlsby": "Houlsby", "convpass": "Convpass",
                  "repadapter": "RepAdapter"}  # issue 16
SCALES = {"ln_tune": "LN-tune", "ssf": "SSF", "difffit": "DiffFit", "fact_tt": "FacT-TT",
          "fact_tk": "FacT-TK"}  # issue 16's scale/shift and factor methods
VQT = {"vqt": "VQT"}  # the zoo (issue 16), after sidetune (a Table 1 row)
PEFT = {"dora": "DoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr", "vera": "VeRA", "boft": "BOFT",
        "fourierft": "FourierFT"}  # methods/peft_tuners.py, after the hand-written ones
AFTER_TABLE_1 = [*LORA, *ADAPTER_FAMILY, *SCALES, *VQT, *PEFT]  # in this order, wherever a new method goes
LABELS = TABLE_1 | LORA | ADAPTER_FAMILY | SCALES | VQT | PEFT


def literal_calls(path: Path, function: str, arg: int = 0) -> list[str]:
    """The string literal passed as argument `arg` of every `function(...)` call in the file at `path`."""
    return [node.args[arg].value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function
            and len(node.args) > arg and isinstance(node.args[arg], ast.Constant)]


def declared_methods() -> list[str]:
    """Every method the source declares, read with `ast`: each `register_method("name")` and `peft_method("name")`
    (a class decorator) in methods/, and each row of methods/peft_table.py (`tuner(peft_type, "name", ...)`) that no
    `peft_method` decorator declares (methods/peft_zoo.py registers those from the table)."""
    names, decorated = [], []
    for path in sorted(METHODS_DIR.rglob("*.py")):
        names += literal_calls(path, "register_method")
        decorated += literal_calls(path, "peft_method")
    rows = literal_calls(METHODS_DIR / "peft_table.py", "tuner", 1)
    assert len(set(rows)) == len(rows), "a row of the peft table twice"  # a dict keeps the last one silently
    assert set(decorated) <= set(rows)  # each hand-tuned peft wrapper has its row
    return names + decorated + [row for row in rows if row not in decorated]


def test_every_method_in_the_source_is_registered_exactly_once():
    registered, declared = list_methods(), declared_methods()
    assert len(set(registered)) == len(registered) and len(set(declared)) == len(declared)
    assert sorted(registered) == sorted(declared)  # every methods/*.py module is imported by methods/__init__.py
    assert set(LABELS) <= set(registered)


def test_table_order_is_the_papers_rows_then_the_rest_then_unknown_names():
    order = table_order(list_methods())
    assert sorted(order) == sorted(list_methods())  # every registered method, once
    assert order[:len(TABLE_1)] == list(TABLE_1)
    rest = order[len(TABLE_1):]
    assert rest == [m for m in list_methods() if m not in TABLE_1]  # the rest in registration order
    assert [m for m in rest if m in AFTER_TABLE_1] == AFTER_TABLE_1
    assert table_order(["old_method", "vpt_deep", "a_method", "full"]) == ["full", "vpt_deep", "a_method", "old_method"]


def test_fig3_methods_are_the_papers_six_and_the_grids_default():
    assert fig3_methods() == FIG3 and list(PAPER_METHODS) == FIG3


def test_every_method_has_its_own_label_and_colour():
    assert {m: label(m) for m in LABELS} == LABELS
    labels = [label(m) for m in list_methods()]
    assert all(get_method_class(m).label for m in list_methods())  # its own, not the name as a fallback
    assert len(set(labels)) == len(labels)
    colours = [color(m) for m in list_methods()]
    assert len(set(colours)) == len(colours) and "#7f7f7f" not in colours  # the fallback grey is for unknown names
    assert color("partial_k") == get_method_class("partial_k").color != color("no_such_method") == "#7f7f7f"
    assert label("no_such_method") == "no_such_method"
