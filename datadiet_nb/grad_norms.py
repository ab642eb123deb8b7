"""Exact per-example gradient norms over all parameters at about the cost of one forward + backward.

Backprop already holds what each example's weight gradient is made of: a layer's input ``a`` and
the gradient ``g`` at its output. Hooks collect both, and each layer's share of every example's
squared gradient norm is computed from them without forming the full per-example gradients:

- Linear: ||a_i||^2 ||g_i||^2, plus ||g_i||^2 for the bias.
- Conv2d: the per-example weight gradient g_i U_i^T (U_i = unfolded input), either materialised
  (one kernel offset at a time, from views of the input) and squared, or as the "ghost norm"
  <U_i^T U_i, g_i^T g_i> over output positions; plus ||sum_positions g_i||^2 for the bias. The one
  with fewer multiply-adds for the layer's shape is used (:func:`choose_conv_rule`): a choice made from
  the shape alone, never from timings, so every process computes the same bits for the same inputs.
- BatchNorm in eval mode (``SyncBatchNorm`` too: in eval mode it is a plain batch norm) is a fixed
  per-channel affine map: gamma's gradient is sum_pixels g * x_hat and beta's is sum_pixels g.

The backward pass differentiates the summed loss with respect to the *input* only, so autograd
skips every weight-gradient kernel.

The rules are exact only when each parameter is used once, by its own layer's stock ``forward``, in
the one functional call the rule assumes. That is checked twice: before (every parameter belongs,
untied, to a supported layer, subclasses included, whose ``forward`` is not overridden) and during
every forward (a :class:`~torch.overrides.TorchFunctionMode` sees every op that touches a parameter:
it must be that layer's convolution / linear / batch-norm call, made while that layer runs, once).
Anything else (a layer called twice, a weight used outside its layer, an overridden forward, other
parameterised layers) goes to :func:`vmap_grad_norms`, the ``torch.func`` reference, with a warning.
Scores are always taken in eval mode: a model handed over in train mode is switched for the call. A
``torch.compile``-d model is scored through the module it wraps (the same parameters, run eagerly).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

GRAD_CHUNK_BYTES = 512 * 2**20  # memory allowed for materialised per-example gradients at once (vmap)
# Temporaries allowed for one conv rule at once (its batch is split to fit): small on a CPU, where they stay in
# cache; large on a GPU, where each split costs kernel launches (to be tuned by benchmarks/gpu_check.py).
RULE_WORK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}
SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm)
BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# The one functional call through which each supported layer's stock forward uses its parameters.
FUNCTIONAL = {nn.Linear: F.linear, nn.Conv2d: torch.conv2d, nn.BatchNorm2d: F.batch_norm, nn.SyncBatchNorm: F.batch_norm}
# Methods a subclass must not override for the rule to hold (its forward and what that forward calls).
STOCK_METHODS = {nn.Linear: ("forward",), nn.Conv2d: ("forward", "_conv_forward"), nn.BatchNorm2d: ("forward",),
                 nn.SyncBatchNorm: ("forward",)}
T = TypeVar("T")


class NotExact(RuntimeError):
    """The layer rules cannot account for every parameter of this model exactly (see the module docstring)."""


def rule_type(module: nn.Module) -> type | None:
    """The supported layer type whose rule applies to ``module`` (a subclass too, if it keeps the stock
    forward), or None."""
    for base in SUPPORTED:
        if isinstance(module, base):
            stock = all(getattr(type(module), name) is getattr(base, name) for name in STOCK_METHODS[base])
            return base if stock else None
    return None


def _owner_is_supported(module: nn.Module) -> bool:
    base = rule_type(module)
    if base is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros"
    if base in BATCH_NORMS:
        return module.track_running_stats and module.running_mean is not None
    return base is nn.Linear


def hook_rules_cover(model: nn.Module) -> bool:
    """True when every parameter belongs, untied, to a layer that has an exact rule here."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
            if not _owner_is_supported(module):
                return False
    return all(count == 1 for count in owners.values())


class ParameterUse(TorchFunctionMode):
    """Watches one forward pass: every op touching a parameter must be its own layer's functional call,
    made while that layer runs; each layer must run once. ``problems`` names what broke the rule."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.owner = {id(p): layer for layer in layers for p in layer.parameters(recurse=False)}
        self.running: list[nn.Module] = []
        self.calls = {id(layer): 0 for layer in layers}
        self.problems: list[str] = []

    def enter(self, module: nn.Module) -> None:
        self.running.append(module)
        self.calls[id(module)] += 1
        if self.calls[id(module)] == 2:
            self.problems.append(f"{type(module).__name__} is called more than once in one forward")

    def leave(self, module: nn.Module) -> None:
        self.running.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            layer = self.owner.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if layer is None:
                continue
            current = self.running[-1] if self.running else None
            if current is not layer or func is not FUNCTIONAL[rule_type(layer)]:
                name = getattr(func, "__name__", str(func))
                self.problems.append(f"a parameter of {type(layer).__name__} is used by {name} "
                                     f"{'outside its layer' if current is not layer else 'in its layer'}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block (BatchNorm on running statistics, no dropout), then as before."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """The convolution's zero padding as (top, bottom, left, right), for numeric, "valid" or "same" padding."""
    if module.padding == "valid":
        return 0, 0, 0, 0
    if module.padding == "same":  # PyTorch puts the odd pixel of an even total at the bottom/right
        (th, tw) = (d * (k - 1) for d, k in zip(module.dilation, module.kernel_size))
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    (ph, pw) = module.padding
    return ph, ph, pw, pw


def _window_length(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> int:
    """Columns of each window of :func:`_offset_windows`: output rows x padded input width with stride 1, else P."""
    if module.stride == (1, 1):
        _, _, left, right = _padding(module)
        return g.shape[2] * (a.shape[3] + left + right)
    return g.shape[2] * g.shape[3]


def _offset_windows(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Output gradients as [B, C_out, L] and, lazily, for each kernel offset, the input seen there as [B, C_in, L].

    ``G_i @ W_i^T`` is that offset's slice of example i's weight gradient, and the sum of ``W_i^T W_i`` over
    offsets is the Gram matrix of the unfolded input. With stride 1 the windows are views of one flat
    zero-padded copy of the input (rows wrap around; the gradient is zero on the wrapped columns), so no
    unfolded input is formed; with a larger stride each window is a strided copy of the output's size.
    """
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    top, bottom, left, right = _padding(module)
    (batch, c_in, h, w), (ho, wo) = a.shape, g.shape[2:]
    hp, wp = h + top + bottom, w + left + right
    flat = a.new_zeros(batch, c_in, hp * wp + (kw - 1) * dw)  # the tail: room for the last window to wrap
    padded = flat[:, :, :hp * wp].view(batch, c_in, hp, wp)
    padded[:, :, top:top + h, left:left + w] = a
    offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]
    if (sh, sw) == (1, 1):
        rows = g.new_zeros(batch, g.shape[1], ho, wp)
        rows[..., :wo] = g
        length = ho * wp
        return rows.flatten(2), (flat[:, :, r * wp + c:r * wp + c + length] for r, c in offsets)
    windows = (padded[:, :, r:r + sh * (ho - 1) + 1:sh, c:c + sw * (wo - 1) + 1:sw].flatten(2) for r, c in offsets)
    return g.flatten(2), windows


def _materialised_sq_norm(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's weight gradient formed one kernel offset at a time ([C_out, C_in] each), squared and summed.

    Every term is a square, so float32 sums lose nothing to cancellation; offsets are added in float64.
    """
    rows, windows = _offset_windows(module, a, g)
    squared = torch.zeros(len(a), dtype=torch.float64, device=a.device)
    for window in windows:
        squared += torch.linalg.vector_norm(rows @ window.transpose(1, 2), dim=(1, 2)).double().square()
    return squared


def _ghost_sq_norm(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The "ghost norm" <U_i^T U_i, G_i^T G_i>: two [L, L] Gram matrices per example instead of the gradient.

    Their product has terms of both signs, so it is summed in float64.
    """
    rows, windows = _offset_windows(module, a, g)
    gram = None
    for window in windows:
        w_t = window.transpose(1, 2)
        gram = w_t @ window if gram is None else gram.baddbmm_(w_t, window)
    return (gram * (rows.transpose(1, 2) @ rows)).sum((1, 2), dtype=torch.float64)


CONV_RULES = {"materialise": _materialised_sq_norm, "ghost": _ghost_sq_norm}
_RULE_TEMPORARIES = {  # per example, in elements: the padded copies, then the rule's own largest temporaries
    "materialise": lambda c_in, c_out, length: (c_in + c_out) * length + c_in * c_out,
    "ghost": lambda c_in, c_out, length: (c_in + c_out) * length + 5 * length ** 2,  # 3 Gram-sized + a float64 copy
}


def _conv_op_counts(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> dict[str, int]:
    """Multiply-adds per example of each rule over windows of L columns: C_out*fan_in*L materialised,
    L^2*(fan_in + C_out) ghost."""
    length, c_out = _window_length(module, a, g), g.shape[1]
    fan_in = a.shape[1] * module.kernel_size[0] * module.kernel_size[1]
    return {"materialise": c_out * fan_in * length, "ghost": length ** 2 * (fan_in + c_out)}


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall-clock seconds, waiting for the device's queued work on CUDA."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - started


def choose_conv_rule(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> str:
    """The exact rule with fewer multiply-adds per example for this layer and input shape ("materialise" in a tie).

    Deliberately not timed: two processes timing the rules could choose differently and differ in the last
    bits of a score, enough to flip a near tie in the kept set between a run and its resumed twin. On the
    CIFAR ResNet-18 at widths 16 and 64 the count picks the same rule as timing did for every layer
    (benchmarks/README.md).
    """
    counts = _conv_op_counts(module, a, g)
    return "ghost" if counts["ghost"] < counts["materialise"] else "materialise"


def _conv_weight_sq_norm(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, rule: str) -> torch.Tensor:
    """Squared norm of each example's weight gradient by ``rule``, over chunks of examples whose
    temporaries fit in ``RULE_WORK_BYTES``."""
    elements = _RULE_TEMPORARIES[rule](a.shape[1], g.shape[1], _window_length(module, a, g))
    budget = RULE_WORK_BYTES.get(a.device.type, RULE_WORK_BYTES["cpu"])
    chunk = max(1, budget // (elements * a.element_size()))
    return torch.cat([CONV_RULES[rule](module, a[i:i + chunk], g[i:i + chunk]) for i in range(0, len(a), chunk)])


def _conv_sq_norm(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, rule: str) -> torch.Tensor:
    """Squared norm of each example's weight gradient (by ``rule``) plus its bias gradient."""
    squared = _conv_weight_sq_norm(module, a, g, rule)
    if module.bias is not None:
        squared = squared + g.sum((2, 3)).pow(2).sum(1, dtype=torch.float64)
    return squared


def _batchnorm_sq_norm(module: nn.BatchNorm2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """gamma: sum_pixels g * x_hat = (sum g*a - mean * sum g) / sqrt(var + eps), with no full-size temporaries.

    The subtraction costs float32 digits only where a channel's running mean dwarfs its spread.
    """
    squared = torch.zeros(len(a), dtype=torch.float64, device=a.device)
    g_sum = g.sum((2, 3))
    if module.weight is not None:
        g_dot_a = torch.linalg.vecdot(g.flatten(2), a.flatten(2))
        gamma = (g_dot_a - module.running_mean * g_sum) / torch.sqrt(module.running_var + module.eps)
        squared = squared + gamma.pow(2).sum(1, dtype=torch.float64)
    if module.bias is not None:
        squared = squared + g_sum.pow(2).sum(1, dtype=torch.float64)
    return squared


def _linear_sq_norm(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if a.ndim > 2:  # a sequence dimension: sum over it of outer products, materialised per example
        squared = (g.transpose(1, 2) @ a).flatten(1).pow(2).sum(1, dtype=torch.float64)
        bias = g.sum(1)
    else:
        squared = a.pow(2).sum(1, dtype=torch.float64) * g.pow(2).sum(1, dtype=torch.float64)
        bias = g
    if module.bias is not None:
        squared = squared + bias.pow(2).sum(1, dtype=torch.float64)
    return squared


RULES = {nn.Linear: _linear_sq_norm, nn.BatchNorm2d: _batchnorm_sq_norm, nn.SyncBatchNorm: _batchnorm_sq_norm}


@dataclass(frozen=True)
class LayerTime:
    """One layer's share of a :func:`hook_grad_norms` call when profiling: what it is, the rule, seconds."""

    layer: str
    rule: str
    seconds: float


def describe_layer(module: nn.Module, a: torch.Tensor) -> str:
    """A short name for a layer's type and shape, e.g. ``Conv2d 64->64 3x3 /1 on 32x32``."""
    size = "x".join(map(str, a.shape[2:]))
    if isinstance(module, nn.Conv2d):
        kernel = "x".join(map(str, module.kernel_size))
        return f"Conv2d {module.in_channels}->{module.out_channels} {kernel} /{module.stride[0]} on {size}"
    if isinstance(module, BATCH_NORMS):
        return f"{type(module).__name__} {module.num_features} on {size}"
    return f"{type(module).__name__} {module.in_features}->{module.out_features}"


def _layer_sq_norm(module: nn.Module, a: torch.Tensor, g: torch.Tensor, conv_rule: str | None
                   ) -> tuple[torch.Tensor, str]:
    """This layer's share of each example's squared gradient norm, and the name of the rule used."""
    if isinstance(module, nn.Conv2d):
        rule = conv_rule or choose_conv_rule(module, a, g)
        return _conv_sq_norm(module, a, g, rule), rule
    base = rule_type(module)
    return RULES[base](module, a, g), base.__name__


def hook_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, conv_rule: str | None = None,
                    profile: list[LayerTime] | None = None) -> torch.Tensor:
    """Per-example ||grad_theta CE(f(x_i), y_i)||_2 over all parameters for one batch (model in eval mode).

    ``conv_rule`` forces one of :data:`CONV_RULES` (default: :func:`choose_conv_rule`); a ``profile``
    list receives a :class:`LayerTime` per layer (timed with a device sync each, so a little slower).
    """
    if conv_rule is not None and conv_rule not in CONV_RULES:
        raise ValueError(f"unknown conv rule {conv_rule!r}; choose one of {sorted(CONV_RULES)}")
    squared = torch.zeros(len(x), dtype=torch.float64, device=x.device)

    def on_forward(module, args, output):
        a = args[0].detach()
        if isinstance(module, BATCH_NORMS) and a.ndim != 4:
            use.problems.append(f"{type(module).__name__} sees a {a.ndim}-D input (its rule is for images)")
            return

        def accumulate(g: torch.Tensor) -> None:  # g: gradient at this output, before any in-place edit of it
            nonlocal squared
            share = partial(_layer_sq_norm, module, a.float(), g.float(), conv_rule)
            if profile is None:
                value, _ = share()
            else:
                (value, rule), seconds = timed(share, x.device)
                profile.append(LayerTime(describe_layer(module, a), rule, seconds))
            squared = squared + value
        output.register_hook(accumulate)

    layers = [module for module in model.modules()
              if rule_type(module) is not None and any(True for _ in module.parameters(recurse=False))]
    use = ParameterUse(layers)
    handles = [handle for layer in layers for handle in (
        layer.register_forward_pre_hook(lambda module, args: use.enter(module)),
        layer.register_forward_hook(lambda module, args, output: use.leave(module)),
        layer.register_forward_hook(on_forward))]
    try:
        with eval_mode(model):
            x = x.detach().requires_grad_(True)
            with use:
                logits = model(x)
            if use.problems:
                raise NotExact(use.problems[0])
            loss = F.cross_entropy(logits.float(), y, reduction="sum")  # examples do not interact in eval mode
            torch.autograd.grad(loss, x)
    finally:
        for handle in handles:
            handle.remove()
    return squared.sqrt()


def vmap_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference: per-example gradients with torch.func (vmap of grad), squared and summed."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    chunk = max(1, GRAD_CHUNK_BYTES // (4 * sum(p.numel() for p in params.values())))

    def example_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)).float(), yi.unsqueeze(0))

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk)(params, x, y)
    return sum(g.pow(2).flatten(1).sum(1, dtype=torch.float64) for g in grads.values()).sqrt()


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``-d model wraps (the same parameters), else the model itself."""
    if hasattr(model, "_orig_mod") and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model._orig_mod
    return model


def per_example_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact per-example gradient norms in eval mode: the hook rules when they account for every
    parameter exactly, else torch.func with a warning that says why."""
    model = uncompiled(model)
    reason = None
    if hook_rules_cover(model):
        try:
            return hook_grad_norms(model, x, y)
        except NotExact as error:
            reason = str(error)
    else:
        reason = f"it has parameters outside the layers with an exact rule ({[t.__name__ for t in SUPPORTED]}, " \
                 f"stock forward, untied)"
    warnings.warn(f"{type(model).__name__}: {reason}; GraNd falls back to torch.func vmap(grad) (exact, slower)",
                  stacklevel=2)
    with eval_mode(model):
        return vmap_grad_norms(model, x, y)
