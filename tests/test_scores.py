import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datadiet_nb import grad_norms, models
from datadiet_nb.grad_norms import CONV_RULES, LayerTime, hook_grad_norms
from datadiet_nb.scores import el2n_scores, grand_last_layer_scores, grand_scores


def _with_nontrivial_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def reference_grand(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example autograd loop: the full gradient of each example's own loss, all parameters, float64 sum."""
    model.eval()
    norms = []
    for x, y in zip(inputs, targets):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        norms.append(sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt())
    return torch.stack(norms)


def test_el2n_matches_hand_computation():
    model = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]]))
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5]])
    y = torch.tensor([2, 1])
    expected = []
    for xi, yi in zip(x.tolist(), y.tolist()):
        logits = [xi[0], xi[1], xi[2], sum(xi)]
        exps = [np.exp(v) for v in logits]
        probs = [e / sum(exps) for e in exps]
        expected.append(np.sqrt(sum((p - (k == yi)) ** 2 for k, p in enumerate(probs))))
    scores = el2n_scores(model, x, y)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)
    # uniform prediction over 4 classes: sqrt(3 * 1/16 + (3/4)^2) = sqrt(0.75), the L2 norm, not squared
    assert scores[0].item() == pytest.approx(np.sqrt(0.75), rel=1e-6)


def test_grand_equals_per_example_autograd_on_conv_net_with_batchnorm():
    torch.manual_seed(0)
    model = _with_nontrivial_batchnorm(models.build("smallcnn", num_classes=5, in_channels=2, width=6))
    inputs, targets = torch.randn(13, 2, 8, 8), torch.randint(0, 5, (13,))
    expected = reference_grand(model, inputs, targets)
    model.train()  # grand_scores must switch to eval mode itself, and switch back
    for batch_size in (1, 4, 256):  # no dropped last batch, whatever the batch size
        got = grand_scores(model, inputs, targets, batch_size=batch_size)
        assert got.shape == (13,)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)
    assert model.training


def test_grand_covers_every_parameter():
    """A score that ignored the convolutions (last-layer GraNd) would differ from the full one."""
    torch.manual_seed(1)
    model = _with_nontrivial_batchnorm(models.build("resnet18", num_classes=3, width=4))
    inputs, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    full = grand_scores(model, inputs, targets, batch_size=3).double()
    torch.testing.assert_close(full, reference_grand(model, inputs, targets), rtol=1e-4, atol=0)
    last = grand_last_layer_scores(model, inputs, targets).double()
    assert torch.all(last < full)


def test_grand_last_layer_matches_autograd_of_the_head():
    torch.manual_seed(2)
    model = _with_nontrivial_batchnorm(models.build("smallcnn", num_classes=4, in_channels=1, width=4)).eval()
    head = model[-1]
    inputs, targets = torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,))
    expected = []
    for x, y in zip(inputs, targets):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        expected.append((head.weight.grad.pow(2).sum() + head.bias.grad.pow(2).sum()).sqrt())
    torch.testing.assert_close(grand_last_layer_scores(model, inputs, targets, batch_size=2),
                               torch.stack(expected), rtol=1e-4, atol=1e-7)


def test_scores_are_in_input_order():
    torch.manual_seed(3)
    model = models.build("smallcnn", num_classes=3, in_channels=1, width=4)
    inputs, targets = torch.randn(9, 1, 8, 8), torch.randint(0, 3, (9,))
    perm = torch.randperm(9)
    for fn in (el2n_scores, grand_scores):
        torch.testing.assert_close(fn(model, inputs, targets)[perm], fn(model, inputs[perm], targets[perm]))


@pytest.mark.parametrize("name, width, size", [("resnet18", 64, 32), ("resnet50", 8, 32)])
def test_grand_is_exact_on_cifar_resnets(name, width, size):
    torch.manual_seed(4)
    model = _with_nontrivial_batchnorm(models.build(name, num_classes=10, width=width))
    inputs, targets = torch.randn(3, 3, size, size), torch.randint(0, 10, (3,))
    torch.testing.assert_close(grand_scores(model, inputs, targets, batch_size=2).double(),
                               reference_grand(model, inputs, targets), rtol=1e-4, atol=0)


def test_grand_with_in_place_relu_and_residual_adds():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x  # in place on the BatchNorm output, as torchvision's ResNets do
            return self.relu(out)

    torch.manual_seed(5)
    model = _with_nontrivial_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.ReLU(inplace=True),
                                                     Block(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)))
    inputs, targets = torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
    torch.testing.assert_close(grand_scores(model, inputs, targets).double(), reference_grand(model, inputs, targets),
                               rtol=1e-4, atol=0)


def test_layers_without_a_rule_fall_back_to_torch_func_and_say_so():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    inputs, targets = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match="torch.func"):
        got = grand_scores(model, inputs, targets)
    torch.testing.assert_close(got.double(), reference_grand(model, inputs, targets), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kernel, options", [
    (3, {"padding": 1}),                              # stride 1: the windows are views of the input
    (3, {"stride": 2, "padding": 1, "bias": False}),  # stride 2: strided copies
    ((2, 3), {"stride": (1, 2), "padding": (0, 2)}),  # rectangular kernel, mixed strides
    (3, {"dilation": 2, "padding": 2}),
    (4, {"padding": "same"}),                         # even kernel: asymmetric padding
    (1, {"stride": 2, "bias": False}),                # a ResNet shortcut
])
@pytest.mark.parametrize("rule", sorted(CONV_RULES))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_both_conv_rules_are_exact(kernel, options, rule, monkeypatch):
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, kernel, **options)
    features = conv(torch.zeros(1, 3, 9, 11)).numel()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 3)).eval()
    inputs, targets = torch.randn(5, 3, 9, 11), torch.randint(0, 3, (5,))
    expected = reference_grand(model, inputs, targets)
    torch.testing.assert_close(hook_grad_norms(model, inputs, targets, conv_rule=rule), expected, rtol=1e-4, atol=0)
    monkeypatch.setattr(grad_norms, "RULE_WORK_BYTES", {"cpu": 1})  # one example at a time
    torch.testing.assert_close(hook_grad_norms(model, inputs, targets, conv_rule=rule), expected, rtol=1e-4, atol=0)


def test_the_conv_rule_follows_the_operation_count_never_a_timing(monkeypatch):
    """Same shape, same rule, same bits in every process: nothing is timed unless a profile is asked for."""
    torch.manual_seed(8)
    model = _with_nontrivial_batchnorm(models.build("resnet18", num_classes=3, width=4)).eval()
    inputs, targets = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    timings = []
    real_timed = grad_norms.timed
    monkeypatch.setattr(grad_norms, "timed", lambda *a: timings.append(1) or real_timed(*a))
    first = hook_grad_norms(model, inputs, targets)
    assert timings == []  # no profile: nothing timed
    torch.testing.assert_close(first, reference_grand(model, inputs, targets), rtol=1e-4, atol=0)
    clock = iter(np.random.default_rng(0).permutation(10_000) * 1e-3)  # a clock gone mad changes nothing
    monkeypatch.setattr(grad_norms.time, "perf_counter", lambda: next(clock))
    profile: list[LayerTime] = []
    assert torch.equal(hook_grad_norms(model, inputs, targets, profile=profile), first)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(timings) == len(profile) and sum(t.layer.startswith("Conv2d") for t in profile) == len(convs)
    # by hand: stride-1 windows are (output rows) x (padded input width) columns; otherwise output pixels
    for t in profile:
        if t.layer.startswith("Conv2d"):
            c, c_out, k, s, n = map(int, re.match(r"Conv2d (\d+)->(\d+) (\d)x\d /(\d) on (\d+)x", t.layer).groups())
            out = n // s
            length = out * (n + k - 1) if s == 1 else out * out
            fan_in = c * k * k
            cheaper = "ghost" if length ** 2 * (fan_in + c_out) < c_out * fan_in * length else "materialise"
            assert t.rule == cheaper, t.layer
    assert {t.rule for t in profile if t.layer.startswith("Conv2d")} == set(CONV_RULES)  # both occur here
    for rule in CONV_RULES:  # a forced rule is the one used, in every conv layer
        forced: list[LayerTime] = []
        hook_grad_norms(model, inputs, targets, conv_rule=rule, profile=forced)
        assert [t.rule for t in forced if t.layer.startswith("Conv2d")] == [rule] * len(convs)
    shorter: list[LayerTime] = []  # a last, partial batch: the same rule for every layer
    hook_grad_norms(model, inputs[:2], targets[:2], profile=shorter)
    assert [t.rule for t in shorter] == [t.rule for t in profile]


def test_score_labels_name_the_epoch_and_leave_other_rules_as_they_are():
    from datadiet_nb.scores import Scoring

    scoring = Scoring(epoch=20, epochs={"grand": 0})
    assert [scoring.label(s) for s in ("el2n", "grand", "random", "dense")] == ["EL2N@20", "GraNd@0", "random", "dense"]


@pytest.mark.parametrize("options, message", [
    ({"num_runs": 0}, "the number of scoring runs K must be >= 1, got 0"),
    ({"epochs": {"grand": 1, "forgetting": 2, "ccs": 3}}, "scoring.epochs names unknown score 'ccs'; choose from ['el2n', 'grand', 'forgetting']"),
    ({"trajectory": (1, -1)}, "scoring epochs must be >= 0 (0 = at initialisation)"),
    ({"epoch": -1}, "scoring epochs must be >= 0 (0 = at initialisation)"), ({"batch_size": 0}, "scoring batch size must be >= 1"),
])
def test_each_bad_scoring_option_is_one_clear_error(options, message):
    from datadiet_nb.errors import UserError
    from datadiet_nb.scores import Scoring

    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        Scoring(**options).validate()
    Scoring(batch_size=1, num_runs=1, epoch=0).validate()  # the smallest valid values pass


def test_scores_of_no_examples_are_empty_and_mismatched_targets_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    for score in (el2n_scores, grand_scores):
        assert score(model, torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.int64)).shape == (0,)
        with pytest.raises(ValueError, match="^3 inputs but 2 targets$"):
            score(model, torch.zeros(3, 3, 2, 2), torch.zeros(2, dtype=torch.int64))
