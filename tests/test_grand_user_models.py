"""GraNd stays exact (or falls back loudly) on the kinds of models users register: subclassed layers,
layers called twice, weights used outside their layer or tied, grouped and depthwise convolutions, BatchNorm
without running statistics, Linear on 3-D input, channels_last inputs, a model in train mode."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datadiet_nb import grad_norms
from datadiet_nb.grad_norms import per_example_grad_norms
from datadiet_nb.scores import grand_scores

from test_scores import _with_nontrivial_batchnorm, reference_grand

RTOL = 1e-4


class MyConv(nn.Conv2d):
    """A subclass that keeps the stock forward (e.g. to add a method or an attribute)."""

    def describe(self) -> str:
        return "mine"


class MyLinear(nn.Linear):
    pass


class MyBatchNorm(nn.BatchNorm2d):
    pass


class ScaledConv(nn.Conv2d):
    """A subclass whose forward changes what the weight does: the conv rule would be wrong for it."""

    def forward(self, x):
        return self._conv_forward(x, 2.0 * self.weight, self.bias)


class SubclassNet(nn.Module):
    def __init__(self, conv=MyConv):
        super().__init__()
        self.conv = conv(3, 6, 3, padding=1, bias=True)
        self.bn = MyBatchNorm(6)
        self.fc = MyLinear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1))


class SharedConvNet(nn.Module):
    """One conv applied twice in the forward: its gradient is the sum of both calls' contributions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


class SharedHeadNet(nn.Module):
    """A Linear head applied to two views and summed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(h.mean((2, 3))) + self.head(h.amax((2, 3)))


class OutsideUseNet(nn.Module):
    """A weight also used outside its layer (an extra projection with the head's weight)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.head(h) + F.linear(h, self.head.weight)


def data(n=7, size=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def exact_with_hooks(model, x, y):
    """per_example_grad_norms without any warning (the fast rules were used) and equal to the loop."""
    expected = reference_grand(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = per_example_grad_norms(model, x, y)
    torch.testing.assert_close(got.double(), expected.double(), rtol=RTOL, atol=0)


def exact_with_fallback(model, x, y):
    """per_example_grad_norms says it falls back, and is exact."""
    expected = reference_grand(model, x, y)
    with pytest.warns(UserWarning, match="falls back to torch.func"):
        got = per_example_grad_norms(model, x, y)
    torch.testing.assert_close(got.double(), expected.double(), rtol=RTOL, atol=0)


def test_subclassed_conv_linear_batchnorm_get_their_rules():
    torch.manual_seed(0)
    model = _with_nontrivial_batchnorm(SubclassNet()).eval()
    x, y = data()
    exact_with_hooks(model, x, y)
    # every parameter contributes: zeroing the subclassed conv's gradient would change the norms
    assert grad_norms.rule_type(model.conv) is nn.Conv2d and grad_norms.rule_type(model.fc) is nn.Linear


def test_a_subclass_with_its_own_forward_falls_back():
    torch.manual_seed(0)
    model = _with_nontrivial_batchnorm(SubclassNet(conv=ScaledConv)).eval()
    assert grad_norms.rule_type(model.conv) is None
    exact_with_fallback(model, *data())


@pytest.mark.parametrize("net", [SharedConvNet, SharedHeadNet, OutsideUseNet])
def test_a_layer_used_twice_or_a_weight_used_outside_its_layer_falls_back(net):
    torch.manual_seed(0)
    model = net().eval()
    x, y = data(classes=4)
    with pytest.raises(grad_norms.NotExact):
        grad_norms.hook_grad_norms(model, x, y)
    exact_with_fallback(model, x, y)


def test_channels_last_inputs_and_model():
    torch.manual_seed(0)
    model = _with_nontrivial_batchnorm(SubclassNet()).eval()
    x, y = data()
    expected = reference_grand(model, x, y)
    model = model.to(memory_format=torch.channels_last)
    got = per_example_grad_norms(model, x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(got.double(), expected.double(), rtol=RTOL, atol=0)


def test_a_model_handed_over_in_train_mode_is_scored_in_eval_mode_and_handed_back():
    torch.manual_seed(0)
    model = _with_nontrivial_batchnorm(SubclassNet())
    x, y = data()
    expected = reference_grand(model, x, y)  # eval mode: BatchNorm on its running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    got = per_example_grad_norms(model, x, y)
    assert model.training, "the caller's mode is restored"
    torch.testing.assert_close(got.double(), expected.double(), rtol=RTOL, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "running stats untouched"
    torch.testing.assert_close(grand_scores(model.train(), x, y, batch_size=3).double(), expected.double(),
                               rtol=RTOL, atol=0)


class TiedNet(nn.Module):
    """Input embedding and output layer share one weight (tied), through two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.project = nn.Linear(5, 5)
        self.head = nn.Linear(5, 5)
        self.head.weight = self.project.weight

    def forward(self, x):
        return self.head(torch.tanh(self.project(self.conv(x).mean((2, 3)))))


def conv_net(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> nn.Module:
    layers = [nn.Conv2d(3, conv.in_channels, 1), conv, *([bn] if bn is not None else []), nn.ReLU(), nn.Flatten()]
    body = nn.Sequential(*layers)
    with torch.no_grad():
        features = body(torch.zeros(1, 3, 8, 8)).shape[1]
    return nn.Sequential(body, nn.Linear(features, 5))


class SequenceNet(nn.Module):
    """A Linear applied to a [batch, tokens, features] input (per-token projection), then pooled."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(6, 7)
        self.head = nn.Linear(7, 5)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)[:, :, :3].repeat(1, 1, 2)  # [B, 64, 6]
        return self.head(torch.relu(self.token(tokens)).mean(1))


@pytest.mark.parametrize("name, build, expect", [  # expect: exact by the hook rules, or a loud fallback
    ("tied weights", TiedNet, "fallback"),
    ("grouped conv", lambda: conv_net(nn.Conv2d(4, 6, 3, padding=1, groups=2)), "fallback"),
    ("depthwise conv", lambda: conv_net(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)), "fallback"),
    ("BatchNorm without running statistics", lambda: conv_net(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), "fallback"),
    ("Linear on 3-D input", SequenceNet, "hooks"),
])
def test_what_the_hook_rules_must_refuse_or_handle_is_exact_either_way(name, build, expect):
    """Each is exact against the per-example loop: by the hook rules where they hold, else by a loud fallback."""
    torch.manual_seed(3)
    model = build().eval()
    x, y = data()
    assert grad_norms.hook_rules_cover(model) == (expect == "hooks"), name
    (exact_with_hooks if expect == "hooks" else exact_with_fallback)(model, x, y)
