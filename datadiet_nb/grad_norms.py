"""Exact per-example gradient norms over all parameters at about the cost of one forward + backward.

Backprop already holds what each example's weight gradient is made of: a layer's input ``a`` and
the gradient ``g`` at its output. Hooks collect both, and each layer's share of every example's
squared gradient norm is computed from them without forming the full per-example gradients:

- Linear: ||a_i||^2 ||g_i||^2, plus ||g_i||^2 for the bias.
- Conv2d: the per-example weight gradient g_i U_i^T (U_i = unfolded input), either materialised
  and squared, or as the "ghost norm" <U_i^T U_i, g_i^T g_i> over output positions, whichever
  takes fewer operations for the layer's shape; plus ||sum_positions g_i||^2 for the bias.
- BatchNorm in eval mode is a fixed per-channel affine map: gamma's gradient is sum_pixels g * x_hat
  and beta's is sum_pixels g.

The backward pass differentiates the summed loss with respect to the *input* only, so autograd
skips every weight-gradient kernel. Models with other parameterised layers (or tied parameters)
go to :func:`vmap_grad_norms`, the ``torch.func`` reference.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

GRAD_CHUNK_BYTES = 512 * 2**20  # memory allowed for materialised per-example gradients at once
SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def _owner_is_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    if isinstance(module, nn.BatchNorm2d):
        return module.track_running_stats and module.running_mean is not None
    return isinstance(module, nn.Linear)


def hook_rules_cover(model: nn.Module) -> bool:
    """True when every parameter belongs, untied, to a layer that has an exact rule here."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
            if not _owner_is_supported(module):
                return False
    return all(count == 1 for count in owners.values())


def _conv_sq_norm(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared norm of each example's weight gradient (and bias gradient) of a convolution."""
    batch, c_out = g.shape[:2]
    g = g.flatten(2)  # [B, C_out, P]
    unfolded = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, C_in*k*k, P]
    positions, fan_in = g.shape[2], unfolded.shape[1]
    ghost = positions * positions * (fan_in + c_out) < c_out * fan_in * positions
    if ghost:
        gram_a = unfolded.transpose(1, 2) @ unfolded  # [B, P, P]
        gram_g = g.transpose(1, 2) @ g
        squared = (gram_a * gram_g).sum((1, 2), dtype=torch.float64)
    else:
        chunk = max(1, GRAD_CHUNK_BYTES // (4 * c_out * fan_in))
        squared = torch.cat([(g[i:i + chunk] @ unfolded[i:i + chunk].transpose(1, 2)).pow(2)
                             .sum((1, 2), dtype=torch.float64) for i in range(0, batch, chunk)])
    if module.bias is not None:
        squared = squared + g.sum(2).pow(2).sum(1, dtype=torch.float64)
    return squared


def _batchnorm_sq_norm(module: nn.BatchNorm2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    squared = torch.zeros(len(a), dtype=torch.float64, device=a.device)
    if module.weight is not None:
        shape = (1, -1, 1, 1)
        x_hat = (a - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
        squared = squared + (g * x_hat).sum((2, 3)).pow(2).sum(1, dtype=torch.float64)
    if module.bias is not None:
        squared = squared + g.sum((2, 3)).pow(2).sum(1, dtype=torch.float64)
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


RULES = {nn.Linear: _linear_sq_norm, nn.Conv2d: _conv_sq_norm, nn.BatchNorm2d: _batchnorm_sq_norm}


def hook_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ||grad_theta CE(f(x_i), y_i)||_2 over all parameters for one batch (model in eval mode)."""
    squared = torch.zeros(len(x), dtype=torch.float64, device=x.device)

    def on_forward(module, args, output):
        a = args[0].detach()

        def accumulate(g: torch.Tensor) -> None:  # g: gradient at this output, before any in-place edit of it
            nonlocal squared
            squared = squared + RULES[type(module)](module, a.float(), g.float())
        output.register_hook(accumulate)

    handles = [module.register_forward_hook(on_forward) for module in model.modules()
               if type(module) in RULES and any(True for _ in module.parameters(recurse=False))]
    try:
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")  # examples do not interact in eval mode
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


def per_example_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact per-example gradient norms: the hook rules when they cover the model, else torch.func."""
    if hook_rules_cover(model):
        return hook_grad_norms(model, x, y)
    warnings.warn(f"{type(model).__name__} has layers without an exact per-example rule "
                  f"(rules: {[t.__name__ for t in SUPPORTED]}); using torch.func vmap(grad)", stacklevel=2)
    return vmap_grad_norms(model, x, y)
