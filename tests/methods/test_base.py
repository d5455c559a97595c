"""methods/base.py's numbers by hand: which tensors get weight decay, the warmup + cosine schedule through the real
LambdaLR, SGD momentum without Nesterov and AdamW updates, and top-1 / loss as Lightning reports them."""

from __future__ import annotations

import copy
import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from methods import OptimConfig, create_method
from methods.base import optimizer_and_schedule, warmup_cosine
from tests.helpers.models import make_tiny_vit

NO_DECAY_EMBEDDINGS = {"backbone.pos_embed", "backbone.cls_token"}  # timm's ViT.no_weight_decay(), as named here


def decays(name: str) -> bool:
    """The rule written out by name: biases, norm scales and the position/class embeddings get no weight decay;
    weight matrices, the patch projection's kernel and the VPT prompts do."""
    if name in NO_DECAY_EMBEDDINGS or name.endswith(".bias"):
        return False
    return not re.search(r"(^|\.)(norm\d?|fc_norm)\.weight$", name)


def decay_groups(model) -> dict[str, float]:
    optimizer, _ = optimizer_and_schedule(model, model.optim, 10)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [(names[id(p)], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len({n for n, _ in seen})  # every tensor in one group only
    return dict(seen)


@pytest.mark.parametrize("method", ["vpt_deep", "full", "lora"])
def test_weight_decay_on_matrices_and_prompts_only(method):
    model = create_method(method, make_tiny_vit(), num_classes=3, optim=OptimConfig(lr=0.1, weight_decay=0.05))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {n: 0.05 if decays(n) else 0.0 for n in trained}
    assert decay_groups(model) == expected
    decayed = {n for n, wd in expected.items() if wd}
    if method == "vpt_deep":
        assert decayed == {"vpt_prompts", "backbone.head.weight"}
    if method == "full":  # the rule by hand on the 2-block ViT
        per_block = {f"backbone.blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
        assert decayed == per_block | {"backbone.patch_embed.proj.weight", "backbone.head.weight"}
        assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight",
                "backbone.blocks.0.norm1.weight", "backbone.blocks.1.attn.qkv.bias"} <= set(expected) - decayed
    if method == "lora":
        assert len(decayed) == 2 * 2 + 1  # A and B of qkv (its q and v rows, targets=qv) in two blocks, head weight


def expected_multiplier(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize(("total_steps", "warmup_epochs", "max_epochs", "warmup"), [
    (48, 2.0, 10, 10),  # 9.6 rounds to 10 (a floor would give 9)
    (47, 2.0, 10, 9),  # 9.4 rounds to 9
    (13, 0.5, 4, 2),  # 1.625: fractional warmup epochs
    (30, 1.0, 10, 3),  # the default one epoch of ten
    (20, 0.0, 5, 0),  # no warmup: cosine from the first step
])
def test_schedule_through_the_real_lambdalr(total_steps, warmup_epochs, max_epochs, warmup):
    assert warmup == round(total_steps * warmup_epochs / max_epochs)
    optim = OptimConfig(lr=0.2, warmup_epochs=warmup_epochs, max_epochs=max_epochs)
    model = create_method("bias", make_tiny_vit(), num_classes=3, optim=optim)
    optimizer, schedule = optimizer_and_schedule(model, model.optim, total_steps)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.2 * expected_multiplier(k, warmup, total_steps) for k in range(total_steps + 1)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(0.2) and lrs[0] == pytest.approx(0.2 / warmup)


def test_warmup_cosine_at_interior_steps():
    warmup, total = 5, 45
    for step in (5, 6, 15, 25, 35, 44):
        assert warmup_cosine(step, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 5) / 40)))
    assert warmup_cosine(25, 5, 45) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(15, 5, 45) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))  # a quarter: not linear's 0.75
    assert [warmup_cosine(s, 5, 45) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def small_model(method: str, optimizer: str, weight_decay: float):
    torch.manual_seed(0)
    optim = OptimConfig(optimizer=optimizer, lr=0.3, weight_decay=weight_decay, warmup_epochs=0, max_epochs=1)
    return create_method(method, make_tiny_vit(), num_classes=3, optim=optim)


def loss_on(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def test_sgd_is_momentum_without_nesterov_by_hand(tiny_batch):
    """v = mu v + g + wd w;  w -= lr v  (torch's SGD, dampening 0), with the scheduled lr at each step."""
    total, mu, wd = 4, 0.9, 0.01
    model = small_model("bias", "sgd", wd).train()
    reference = copy.deepcopy(model)
    optimizer, schedule = optimizer_and_schedule(model, model.optim, total)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == mu and optimizer.defaults["nesterov"] is False
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(2):
        optimizer.zero_grad()
        loss_on(model, tiny_batch).backward()
        optimizer.step()
        schedule.step()
        grads = torch.autograd.grad(loss_on(reference, tiny_batch), list(params.values()))
        lr = 0.3 * 0.5 * (1 + math.cos(math.pi * step / total))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads, strict=True):
                velocity[name] = mu * velocity[name] + g + (wd if decays(name) else 0.0) * p
                p -= lr * velocity[name]
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adamw_step_by_hand(tiny_batch):
    """One AdamW step: w <- w (1 - lr wd), then w -= lr g / (|g| + eps) (bias-corrected moments of one step)."""
    wd = 0.1
    model = small_model("bias", "adamw", wd).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer, _ = optimizer_and_schedule(model, model.optim, 4)
    assert isinstance(optimizer, torch.optim.AdamW)
    optimizer.zero_grad()
    loss_on(model, tiny_batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            w, g = before[name], grads[name]
            expected = w * (1 - 0.3 * (wd if decays(name) else 0.0)) - 0.3 * g / (g.abs() + 1e-8)
            torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_top1_and_loss_over_uneven_batches_under_a_trainer(tmp_path):
    """Top-1 is correct / all (micro), and the loss is the mean over images, batches of 4, 4 and 2 weighted by size.
    The head predicts class 0 for every image; labels 6 x 0, 2 x 1, 2 x 2 make micro (0.6) differ from a per-class
    mean (1/3) and the image mean of the loss from the mean of the batch means."""
    model = create_method("bias", make_tiny_vit(), num_classes=3)
    with torch.no_grad():
        model.backbone.head.weight.zero_()
        model.backbone.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    loader = DataLoader(TensorDataset(torch.randn(10, 3, 32, 32), labels), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    val = trainer.validate(model, loader, verbose=False)[0]
    test = trainer.test(model, loader, verbose=False)[0]
    log_z = math.log(math.e + 2)  # log-sum-exp of the logits (1, 0, 0)
    for metrics, stage in ((val, "val"), (test, "test")):
        assert metrics[f"{stage}/acc"] == pytest.approx(0.6)
        assert metrics[f"{stage}/loss"] == pytest.approx(log_z - 0.6, abs=1e-6)  # (6 (log_z - 1) + 4 log_z) / 10


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_schedule_steps_per_update_under_a_trainer(tmp_path):
    """2 epochs of 3 batches: 6 updates, warmup round(6 * 1 / 2) = 3, the lr read before each update."""
    torch.manual_seed(0)
    model = create_method("bias", make_tiny_vit(), num_classes=3,
                          optim=OptimConfig(lr=0.1, warmup_epochs=1, max_epochs=2))
    record = RecordLR()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                        default_root_dir=tmp_path)
    data = TensorDataset(torch.randn(12, 3, 32, 32), torch.randint(0, 3, (12,)))
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert record.lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.075, 0.025])  # cosine: 1, 3/4, 1/4
