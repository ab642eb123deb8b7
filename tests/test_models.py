import pytest
import torch

from datadiet_nb import models
from datadiet_nb.errors import UserError


def test_cifar_resnet18_has_the_standard_parameter_count():
    assert models.num_parameters(models.build("resnet18", num_classes=10)) == 11_173_962


@pytest.mark.parametrize("name, width, size", [("resnet18", 8, 32), ("resnet50", 4, 32), ("smallcnn", 8, 8)])
@pytest.mark.parametrize("num_classes", [3, 100])
def test_models_take_the_class_count_from_the_caller(name, width, size, num_classes):
    in_channels = 1 if name == "smallcnn" else 3
    model = models.build(name, num_classes=num_classes, in_channels=in_channels, width=width).eval()
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, num_classes)


def test_resnet_stem_is_low_resolution():
    model = models.build("resnet18", num_classes=10, width=8)
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_unknown_model_and_bad_option():
    with pytest.raises(UserError, match="unknown model"):
        models.build("vgg16", num_classes=10)
    with pytest.raises(UserError, match="depth"):
        models.build("resnet18", num_classes=10, depth=3)


def test_registry_accepts_user_models():
    @models.register("tiny-linear")
    def tiny(*, num_classes, in_channels, size=8):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * size * size, num_classes))
    try:
        assert models.build("tiny-linear", num_classes=4, in_channels=1)(torch.zeros(1, 1, 8, 8)).shape == (1, 4)
    finally:
        models.MODELS.pop("tiny-linear")
