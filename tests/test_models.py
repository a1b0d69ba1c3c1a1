import pytest
import torch

from ewc.models import MLP, SimpleCNN, build_model


def test_mlp_shapes():
    model = MLP(784, 10, (400, 400))
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 400 + 400 + 400 * 400 + 400 + 4010


@pytest.mark.parametrize("side", [28, 8])
def test_cnn_is_the_seed_architecture(side):
    model = SimpleCNN(1, 10, side)
    assert model(torch.zeros(2, 1, side, side)).shape == (2, 10)
    widths = [m.out_channels for m in model if isinstance(m, torch.nn.Conv2d)]
    fcs = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    assert widths == [32, 64] and fcs == [768, 10]


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="square images"):
        build_model("cnn", (784,), 10)
