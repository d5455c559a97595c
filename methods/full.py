"""Full fine-tuning: every backbone parameter and the new head train (the paper's FULL baseline)."""

from methods.base import TuningModule
from methods.registry import register_method


@register_method("full")
class FullFineTuning(TuningModule):
    def adapt(self) -> None:
        self.backbone.requires_grad_(True)
