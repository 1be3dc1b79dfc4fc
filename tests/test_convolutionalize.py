"""Convolutionalization (FCN Sec. 3.1): fully connected layers as convolutions give the same logits."""

import pytest
import torch
import torch.nn as nn
from torchvision.models import vgg16

from pixelwise.layers import convolutionalize


def test_small_classifier_equals_linear_and_slides():
    torch.manual_seed(0)
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(16, 12),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(12, 5),
    ).eval()
    fcn = convolutionalize(classifier, in_channels=8, spatial=3).eval()
    assert [type(m) for m in fcn] == [nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d]
    assert fcn[0].kernel_size == (3, 3) and fcn[3].kernel_size == (1, 1)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x)[:, :, 0, 0], classifier(x), atol=1e-5, rtol=0)
        # on a larger map every output position is the classifier applied to its 3x3 window
        big = torch.randn(1, 8, 6, 7)
        scores = fcn(big)
        assert scores.shape == (1, 5, 4, 5)
        torch.testing.assert_close(scores[0, :, 2, 3], classifier(big[:, :, 2:5, 3:6])[0], atol=1e-5, rtol=0)
    # the copy is independent of the original
    with torch.no_grad():
        fcn[0].weight.zero_()
    assert classifier[1].weight.abs().sum() > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="in_features=72"):
        convolutionalize(nn.Sequential(nn.Linear(72, 4)), in_channels=8, spatial=2)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        convolutionalize(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)), in_channels=8, spatial=1)


def test_vgg16_classifier_gives_the_same_logits():
    torch.manual_seed(0)
    model = vgg16(weights=None).eval()  # random init, no download
    fcn = convolutionalize(model.classifier, in_channels=512, spatial=7).eval()
    assert fcn[0].weight.shape == (4096, 512, 7, 7) and fcn[6].weight.shape == (1000, 4096, 1, 1)
    # the features of a 224x224 image are (1, 512, 7, 7); random ones keep the test fast
    feats = torch.randn(1, 512, 7, 7).relu()
    with torch.no_grad():
        logits = model.classifier(torch.flatten(model.avgpool(feats), 1))
        scores = fcn(feats)
        assert scores.shape == (1, 1000, 1, 1)
        torch.testing.assert_close(scores[:, :, 0, 0], logits, atol=1e-4, rtol=0)
        # a larger input gives a spatial score map: 288 px -> 9x9 features -> 3x3 scores
        assert model.features(torch.randn(1, 3, 64, 64)).shape[-3:] == (512, 2, 2)  # stride 32
        assert fcn(torch.randn(1, 512, 9, 9)).shape == (1, 1000, 3, 3)
