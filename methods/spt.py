"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023, https://arxiv.org/abs/2303.08566;
github:ziplab/SPT), both of its variants: `spt_lora` (SPT-LoRA) and `spt_adapter` (SPT-Adapter).

Before training, one pass over training batches scores every candidate backbone weight by its sensitivity; under a
budget of trainable parameters the top-tau scores are chosen; a weight matrix holding enough chosen entries is tuned
structurally (a LoRA or an adapter on it), every other one tunes only its chosen entries. Follows the official code
(engine.py `get_sensitivity`, model/vision_transformer_timm.py `StructuredTuningModule`, `AttentionSPTParallel`,
`AttentionSPTSeq`, `MlpSPTParallel`, `MlpSPTSeq`, `LinearSPTSparseGrad`, train_spt.py, configs/vtab_supervised_*.sh):
- Sensitivity (code): the squared gradient of the cross-entropy through the new head, g^2, summed over the first
  `sensitivity_batches` batches (the code's --sensitivity_batch_num 16, batch 32; the paper's first-order Taylor
  estimate with one gradient step, s = g * eps * g). Ours reads the run's training loader (shuffled, the run's batch
  size); the code reads the training split in order. Ours keeps the frozen backbone in eval mode (methods/base.py),
  the code scores in train mode (its drop-path 0.1 active). Under several processes the scores are summed.
- Candidates (code): every block's q, k, v (the three row blocks of timm's fused qkv), proj, fc1, fc2 weights, their
  biases, the block norms and the final norm. Not candidates: the patch embedding, position embedding and class token
  (the code's grad_skip_kwd_list); the class token trains whole, as in the code.
- Granularity (code): a matrix is structured when its chosen entries number at least its module's size / `alpha`
  (10), a vector (bias, norm) trains whole when at least its length / `beta` (5) of it is chosen (--structured_vector,
  on in every script); the rest train their chosen entries only. Module sizes: LoRA r (in + out), adapter
  2 out r + r + out (its biases on), r = `rank` (--low_rank_dim 8).
- Budget: the parameters tuned besides the head, class token included (the code's total + 768). The code sweeps tau
  (0.02M steps) and keeps the point whose total is nearest each budget; ours takes the largest tau whose total fits
  (the total never falls as tau grows), so the allocation never exceeds it, and holds the budget as one tensor
  `spt.values`: every chosen entry, every module and every whole vector is a slice of it, unused slots stay zero and
  never move. So `tuned_params` is the budget plus the head whatever the data choose, and a checkpoint holds the
  values, their places (`spt.index`, `spt.layout`) and nothing else. The code's scripts sweep 0.2-1.0M per VTAB task
  and keep the best; ours defaults to 0.4M, the middle of that sweep (an option).
- SPT-LoRA (code's BlockSPTParallel): W x + B A dropout(x), scale 1 (no alpha / r), A Kaiming-uniform (a = sqrt(5)),
  B zero. SPT-Adapter (code's BlockSPTSeq): y = W x, then y + up(GELU(down(dropout(y)))) on the layer's output, down
  Kaiming-uniform with nn.Linear's bias init, up zero. Both branches: dropout 0.1 on their input and drop-path 0.1 on
  their output (the code's structured_drop and StructuredTuningModule.drop_path). As in the code, the attention output
  projection's branch reads that layer's input without the dropout, for the adapter too (in parallel, not after it).
- Chosen entries (code: LinearSPTSparseGrad, a delta added at the chosen places): deltas at zero, added to the frozen
  weights; the code trains entries of nn.Linear weights and biases only, so its chosen norm entries (counted in its
  budget) stay frozen; ours trains them, as the paper describes.
- Weight decay: `spt.values` is 1-D, so timm's rule exempts it; the code decays its modules' matrices (1e-4).
- Starts as the pretrained function (zero deltas, zero B / up). Before the selection pass (a model never trained, as
  in the contract tests) the scores are taken to fall along the candidates' order (the first entries chosen first);
  a run always selects at the start of training, and a rebuilt model reads its saved selection.
- Families: ViT (the code's) and Swin (ours: the same rule over the family row's linears and norms; the official
  repository has no Swin model file).

Tuned at ViT-B/16 with 200 classes at the default budget: 400,000 (class token 768 + 399,232 values) + the head
153,800 = 553,800, for either variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from methods.base import TuningModule
from methods.options import Options, drop_path_option, option
from methods.registry import register_method

STRUCTURED = ("lora", "adapter")
LAYOUT_COLUMNS = 7  # per wrapped layer: weight entries start, end; bias entries start, end; a module offset per part


@dataclass
class SPTLoRAOptions(Options):
    method = "SPT-LoRA"
    budget: int = option(400_000, "parameters tuned besides the head, class token included (official scripts sweep "
                         "0.2M-1.0M per task)", kind=int, positive=True, hint="e.g. budget=400000")
    rank: int = option(8, "rank of each LoRA / adapter (the code's --low_rank_dim 8)", kind=int, positive=True,
                       hint="official 8")
    alpha: float = option(10.0, "a matrix is structured when its chosen entries reach its module's size / alpha "
                          "(the code's --alpha 10)", kind=float, positive=True, hint="official 10")
    beta: float = option(5.0, "a vector trains whole when its chosen entries reach its length / beta (the code's "
                         "--beta 5)", kind=float, positive=True, hint="official 5")
    sensitivity_batches: int = option(16, "training batches whose squared gradients are summed (the code's "
                                      "--sensitivity_batch_num 16)", kind=int, positive=True, hint="official 16")
    dropout: float = option(0.1, "dropout on a module's input (the code's structured_drop 0.1)", kind=float, low=0,
                            high=1, high_open=True)
    branch_drop_path: float = option(0.1, "drop-path on a module's output (the code's 0.1)", kind=float, low=0,
                                     high=1, high_open=True)
    drop_path: float = drop_path_option()


@dataclass
class SPTAdapterOptions(SPTLoRAOptions):
    """SPT-LoRA's options and defaults (the code runs both variants with the same flags)."""

    method = "SPT-Adapter"


@dataclass(frozen=True)
class Site:
    """One candidate: a matrix (a row block of a weight) or a vector, within the tensor `tensor` of layer `layer`."""

    layer: int  # row of the layout table
    part: int  # which row block of the layer's weight / bias (q, k, v of a fused qkv)
    matrix: bool  # a weight matrix's row block (else a vector: a bias, a norm's weight or bias)
    bias: bool  # within the layer's bias (else its weight)
    start: int  # first flat position within its tensor
    size: int
    module_size: int  # what tuning it whole costs: its LoRA / adapter, or its length


def module_size(structured: str, rank: int, in_features: int, out_features: int) -> int:
    """The code's get_structured_param_num: LoRA r (in + out); adapter (biases on) 2 out r + r + out."""
    if structured == "lora":
        return rank * (in_features + out_features)
    return 2 * out_features * rank + rank + out_features


def costs(counts: torch.Tensor, sites: list[Site], alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cost per site, whole per site) for `counts` chosen entries per site: a matrix is whole (structured) from
    module_size / alpha chosen entries on, a vector from size / beta; a whole site costs its module_size."""
    module = torch.tensor([s.module_size for s in sites], dtype=torch.float64, device="cpu")
    divisor = torch.tensor([alpha if s.matrix else beta for s in sites], dtype=torch.float64, device="cpu")
    whole = counts.double() >= module / divisor
    return torch.where(whole, module.long(), counts), whole


class Ranking:
    """The candidates' entries in the order they are chosen: by descending score, or (before a selection pass) in
    the candidates' own order. Positions are global: the sites' entries laid end to end."""

    def __init__(self, sizes: list[int], scores: torch.Tensor | None = None):
        device = "cpu" if scores is None else scores.device  # a pass's scores stay where they were computed
        self.sizes = torch.tensor(sizes, device=device)
        self.ends = self.sizes.cumsum(0)
        self.starts = self.ends - self.sizes
        self.order = None if scores is None else scores.argsort(descending=True, stable=True)

    @property
    def total(self) -> int:
        return int(self.ends[-1])

    def counts(self, tau: int) -> torch.Tensor:
        """Chosen entries per site among the first `tau`."""
        if self.order is None:
            return (tau - self.starts).clamp(0).minimum(self.sizes)
        sites = torch.searchsorted(self.ends, self.order[:tau], right=True)
        return torch.bincount(sites, minlength=len(self.sizes)).cpu()

    def chosen(self, tau: int, site: int) -> torch.Tensor:
        """The positions within `site` of its chosen entries, ascending."""
        if self.order is None:
            return torch.arange(int(self.counts(tau)[site]), device="cpu")
        first = self.order[:tau]
        inside = first[(first >= self.starts[site]) & (first < self.ends[site])]
        return (inside.sort().values - self.starts[site]).cpu()


def largest_fitting_tau(ranking: Ranking, sites: list[Site], room: int, alpha: float, beta: float) -> int:
    """The largest tau whose total cost fits `room` (the cost never falls as tau grows: bisection)."""
    low, high = 0, ranking.total
    while low < high:
        middle = (low + high + 1) // 2
        if int(costs(ranking.counts(middle), sites, alpha, beta)[0].sum()) <= room:
            low = middle
        else:
            high = middle - 1
    return low


class SPTValues(nn.Module):
    """The budget as one tensor `values`; `index` (per slot, the flat position a chosen entry adds to within its
    tensor) and `layout` (per wrapped layer, LAYOUT_COLUMNS integers) say where each slot goes."""

    def __init__(self, slots: int, layers: int, device=None):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(slots, device=device))
        self.register_buffer("index", torch.zeros(slots, dtype=torch.long, device=device))
        self.register_buffer("layout", torch.full((layers, LAYOUT_COLUMNS), -1, dtype=torch.long, device=device))
        self.cache: tuple[tuple[int, int], list[list[int]]] | None = None

    def rows(self) -> list[list[int]]:
        """`layout` as Python integers, read from the device only when it has changed (a selection, a load)."""
        key = (self.layout.data_ptr(), self.layout._version)
        if self.cache is None or self.cache[0] != key:
            self.cache = (key, self.layout.tolist())
        return self.cache[1]

    def entries(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index[start:end], self.values[start:end]


def entries_added(spt: SPTValues, row: int, weight: torch.Tensor, bias: torch.Tensor | None):
    """(weight, bias) of layout row `row` with its chosen entries' deltas added at their flat positions."""
    w_start, w_end, b_start, b_end = spt.rows()[row][:4]
    if w_end > w_start:
        weight = weight.flatten().index_add(0, *spt.entries(w_start, w_end)).view_as(weight)
    if bias is not None and b_end > b_start:
        bias = bias.index_add(0, *spt.entries(b_start, b_end))
    return weight, bias


class Branch(nn.Module):
    """A LoRA or adapter of one row block, its tensors slices of SPTValues.values at an offset (the layout's)."""

    def __init__(self, structured: str, rank: int, in_features: int, out_features: int, dropout: float,
                 drop_path: float):
        super().__init__()
        self.structured, self.rank = structured, rank
        self.in_features, self.out_features = in_features, out_features
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def shapes(self) -> list[tuple[int, ...]]:
        r, i, o = self.rank, self.in_features, self.out_features
        return [(r, i), (o, r)] if self.structured == "lora" else [(r, o), (r,), (o, r), (o,)]

    def init(self, values: torch.Tensor) -> None:
        """Fill a fresh slice: LoRA A Kaiming-uniform, B zero; adapter down as nn.Linear (weight Kaiming-uniform, bias
        uniform in +-1/sqrt(fan_in)), up zero."""
        first = values[:math.prod(self.shapes()[0])].view(self.shapes()[0])
        nn.init.kaiming_uniform_(first, a=math.sqrt(5))
        if self.structured == "adapter":
            bound = 1 / math.sqrt(self.out_features)
            values[first.numel():first.numel() + self.rank].uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, values: torch.Tensor, offset: int, dropped: bool = True) -> torch.Tensor:
        tensors, at = [], offset
        for shape in self.shapes():
            tensors.append(values[at:at + math.prod(shape)].view(shape))
            at += math.prod(shape)
        x = self.dropout(x) if dropped else x
        if self.structured == "lora":
            a, b = tensors
            return self.drop_path(F.linear(F.linear(x, a), b))
        down_w, down_b, up_w, up_b = tensors
        return self.drop_path(F.linear(F.gelu(F.linear(x, down_w, down_b)), up_w, up_b))


class SPTLinear(nn.Module):
    """A frozen nn.Linear plus its chosen entries (weight and bias deltas from SPTValues) and a branch per structured
    row block. Keeps the wrapped layer's `weight` and `bias` under their names (the backbone's keys unchanged)."""

    def __init__(self, base: nn.Linear, parts: int, row: int, shared: SPTValues, branches: list[Branch],
                 reads_input: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts, self.row, self.shared = parts, row, (shared,)  # a tuple: not a second owner of the values
        self.branches = nn.ModuleList(branches)
        self.reads_input = reads_input  # the attention output projection: its branch reads the layer's input

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen weight and bias with the chosen entries' deltas added."""
        return entries_added(self.shared[0], self.row, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spt = self.shared[0]
        offsets = spt.rows()[self.row][4:]
        y = F.linear(x, *self.weights())
        if all(offset < 0 for offset in offsets[:self.parts]):
            return y
        pieces = list(y.chunk(self.parts, dim=-1))
        for part, (branch, offset) in enumerate(zip(self.branches, offsets, strict=False)):
            if offset >= 0:
                source = x if self.reads_input or branch.structured == "lora" else pieces[part]
                pieces[part] = pieces[part] + branch(source, spt.values, offset, dropped=not self.reads_input)
        return torch.cat(pieces, dim=-1) if self.parts > 1 else pieces[0]


class SPTLayerNorm(nn.Module):
    """A frozen nn.LayerNorm plus its chosen entries (weight and bias deltas), keeping `weight` and `bias`."""

    def __init__(self, base: nn.LayerNorm, row: int, shared: SPTValues):
        super().__init__()
        self.normalized_shape, self.eps = base.normalized_shape, base.eps
        self.weight, self.bias = base.weight, base.bias
        self.row, self.shared = row, (shared,)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return entries_added(self.shared[0], self.row, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, *self.weights(), self.eps)


class SensitivityTuning(TuningModule):
    structured = "lora"
    families = ("vit", "swin")
    selects_from_data = True

    def adapt(self) -> None:
        backbone, opts, family = self.backbone, self.options, self.family
        device = backbone.patch_embed.proj.weight.device
        token = getattr(backbone, "cls_token", None)
        slots = opts.budget - (token.numel() if token is not None else 0)
        if slots <= 0:
            raise ValueError(f"{self.method_name} budget={opts.budget} leaves nothing besides the class token's "
                             f"{token.numel()} parameters; choose a budget above it (default 400000).")
        layers = self.candidate_layers()
        self.spt = SPTValues(slots, len(layers), device)
        self.sites: list[Site] = []
        self.wrapped: list[nn.Module] = []
        for row, (parent, name, layer, parts, out_projection) in enumerate(layers):
            wrapper = self.wrap(layer, row, parts, out_projection)
            setattr(parent, name, wrapper)
            self.wrapped.append(wrapper)
        if token is not None:
            token.requires_grad_(True)  # trained whole, counted in the budget (the code's fully tuned cls_token)
        if opts.drop_path:
            family.set_drop_path(backbone, opts.drop_path)
        self.allocate(Ranking([s.size for s in self.sites]))

    def candidate_layers(self) -> list[tuple[nn.Module, str, nn.Module, int, bool]]:
        """(parent, attribute, layer, row blocks, is the attention output projection): each block's norms and
        linears in forward order (the fused qkv as three row blocks), then the norm after the blocks."""
        family, found = self.family, []
        qkv, proj = family.attention_linears
        for block in family.blocks(self.backbone):
            attn, mlp = block.get_submodule(family.attention), block.get_submodule(family.mlp)
            found += [(block, family.norms[0], block.get_submodule(family.norms[0]), 1, False),
                      (attn, qkv, getattr(attn, qkv), 3, False), (attn, proj, getattr(attn, proj), 1, True),
                      (block, family.norms[1], block.get_submodule(family.norms[1]), 1, False)]
            found += [(mlp, name, getattr(mlp, name), 1, False) for name in family.mlp_linears]
        for name in family.after_blocks:
            layer = getattr(self.backbone, name, None)
            if isinstance(layer, nn.LayerNorm):
                found.append((self.backbone, name, layer, 1, False))
        for _, name, layer, parts, _ in found:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                raise ValueError(f"{self.method_name} tunes nn.Linear and nn.LayerNorm layers; {name} is a "
                                 f"{type(layer).__name__}.")
            if parts == 3 and layer.out_features != 3 * layer.in_features:
                raise ValueError(f"{self.method_name} splits a fused qkv (out = 3 x in) into q, k and v; this {name} "
                                 f"maps {layer.in_features} -> {layer.out_features}.")
        return found

    def wrap(self, layer: nn.Module, row: int, parts: int, out_projection: bool) -> nn.Module:
        """The SPT wrapper of one layer, its candidate sites appended: weight row blocks, then bias row blocks."""
        opts = self.options
        if isinstance(layer, nn.LayerNorm):
            size = layer.weight.numel()
            self.sites += [Site(row, 0, False, is_bias, 0, size, size)
                           for is_bias in ((False, True) if layer.bias is not None else (False,))]
            return SPTLayerNorm(layer, row, self.spt)
        out = layer.out_features // parts
        branch_in = layer.in_features if self.structured == "lora" or out_projection else out
        size = module_size(self.structured, opts.rank, branch_in, out)
        self.sites += [Site(row, p, True, False, p * out * layer.in_features, out * layer.in_features, size)
                       for p in range(parts)]
        if layer.bias is not None:
            self.sites += [Site(row, p, False, True, p * out, out, out) for p in range(parts)]
        branches = [Branch(self.structured, opts.rank, branch_in, out, opts.dropout, opts.branch_drop_path)
                    for _ in range(parts)]
        return SPTLinear(layer, parts, row, self.spt, branches, out_projection)

    # --- the allocation ------------------------------------------------------------------------------
    def allocate(self, ranking: Ranking) -> None:
        """Choose the largest tau that fits the budget, then lay the chosen entries (layer by layer: weight, then
        bias) and the whole sites' modules out in `spt.values`, and fill them (entries zero, modules initialised)."""
        opts, sites, spt = self.options, self.sites, self.spt
        tau = largest_fitting_tau(ranking, sites, spt.values.numel(), opts.alpha, opts.beta)
        whole = costs(ranking.counts(tau), sites, opts.alpha, opts.beta)[1].tolist()
        index, layout, at = [], [[-1] * LAYOUT_COLUMNS for _ in self.wrapped], 0
        for row in range(len(self.wrapped)):
            for column, is_bias in ((0, False), (2, True)):
                layout[row][column] = at
                for i, site in enumerate(sites):
                    if site.layer == row and site.bias == is_bias and not (site.matrix and whole[i]):
                        chosen = torch.arange(site.size, device="cpu") if whole[i] else ranking.chosen(tau, i)
                        index.append(chosen + site.start)
                        at += len(chosen)
                layout[row][column + 1] = at
        values = torch.zeros(spt.values.numel(), device="cpu")
        for i, site in enumerate(sites):
            if site.matrix and whole[i]:
                branch = self.wrapped[site.layer].branches[site.part]
                layout[site.layer][4 + site.part] = at
                branch.init(values[at:at + site.module_size])
                at += site.module_size
        flat = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device="cpu")
        with torch.no_grad():
            spt.index.zero_()[:len(flat)].copy_(flat)
            spt.layout.copy_(torch.tensor(layout, device="cpu"))
            spt.values.copy_(values)
        self.tau, self.allocated = tau, at

    # --- the sensitivity pass ------------------------------------------------------------------------
    def candidate_tensors(self) -> list[torch.Tensor]:
        """Each wrapped layer's weight, then bias: the tensors the sites cut up, in site order."""
        return [t for layer in self.wrapped for t in (layer.weight, layer.bias) if t is not None]

    def sensitivity(self, loader) -> torch.Tensor:
        """Per candidate entry, in site order: the squared gradient of the loss summed over the first batches."""
        tensors = self.candidate_tensors()
        scores = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
        for t in tensors:
            t.requires_grad_(True)
        try:
            for step, batch in enumerate(loader):
                if step >= self.options.sensitivity_batches:
                    break
                images, labels = self.batch_on_device(batch)
                grads = torch.autograd.grad(self.criterion(self(images), labels), tensors)
                for score, grad in zip(scores, grads, strict=True):
                    score += grad.float().square()
        finally:
            for t in tensors:
                t.requires_grad_(False)
        return self.summed_over_processes(torch.cat([s.flatten() for s in scores]))

    def select_from_data(self, loader) -> None:
        """Score the candidates on the first training batches, then allocate the budget by those scores."""
        scores = self.sensitivity(loader)
        self.allocate(Ranking([s.size for s in self.sites], scores))


@register_method("spt_lora")
class SPTLoRA(SensitivityTuning):
    label, color = "SPT-LoRA", "#00838f"
    options_cls = SPTLoRAOptions
    structured = "lora"


@register_method("spt_adapter")
class SPTAdapter(SensitivityTuning):
    label, color = "SPT-Adapter", "#827717"
    options_cls = SPTAdapterOptions
    structured = "adapter"
