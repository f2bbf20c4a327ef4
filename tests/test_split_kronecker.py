"""bn_split's Kronecker route for a layer feeding a BatchNorm (``SPLIT_KRONECKER``).

Where every statistics direction reaching a weight lives on one of its output
channels (the top BatchNorm's own directions on its convolution), the Gram block
``(V_f + W B)(V_f + W B)ᵀ`` is added as the frozen rows' Kronecker form plus
``Y Wᵀ + W Yᵀ + W B Bᵀ Wᵀ`` with ``Y = V_f Bᵀ`` from the operand: checked in
float64 against the columns strategy (and so against the dense reference, which
``test_engine_strategies`` checks columns against), with groups, without a bias, in
chunks of one statistics row, and refused where directions of a higher BatchNorm
reach the weight on several channels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import RTOL, report_close

from lowrank_ggn import GGN, gram_matrix
from lowrank_ggn.core.engine import assemble
from lowrank_ggn.core.engine.report import LayerTreatment

D = torch.float64


def _two_blocks(groups: int, bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=bias),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("groups, bias", [(1, True), (2, True), (4, False)])
def test_top_convolution_in_kronecker_form_is_exact(groups, bias, chunked, monkeypatch):
    kron = LayerTreatment.KRONECKER
    monkeypatch.setattr(assemble.acc, "choose_form", lambda costs, budget: kron)
    torch.manual_seed(0)
    model = _two_blocks(groups, bias).to(D)
    X, y = torch.randn(6, 2, 4, 4, dtype=D), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    budget = 2**13 if chunked else None  # budget/8 below one row's products
    ggn = GGN(model, loss, X, y, strategy="bn_split", progress=False)
    if chunked:
        real = assemble._add_channel_statistics

        def small(gram, operand, g, B, ks, WT, _):
            return real(gram, operand, g, B, ks, WT, budget)

        monkeypatch.setattr(assemble, "_add_channel_statistics", small)
    split = ggn.gram()
    report = ggn.engine_report
    assert report.fallback is None, report.fallback
    # the top convolution: one channel per direction; the lower one: reached by the
    # top BatchNorm's directions on every channel, unless each top channel reads one
    # lower channel (groups = 4: then one channel per direction there too)
    lower = LayerTreatment.SPLIT_KRONECKER if groups == 4 else LayerTreatment.SPLIT
    assert report.layers["4"] is LayerTreatment.SPLIT_KRONECKER, report.layers
    assert report.layers["0"] is lower, report.layers
    columns = gram_matrix(model, loss, X, y, strategy="columns", progress=False)
    report_close(split, columns, rtol=RTOL, name="bn_split Gram")


def test_row_channels():
    B = torch.zeros(3, 4 * 5)
    B[0, 5:10] = 1.0  # channel 1
    B[2, 15:17] = 2.0  # channel 3; row 1 all zero
    assert assemble.row_channels(B, 4).tolist() == [1, 0, 3]
    B[1, 0] = B[1, 19] = 1.0  # channels 0 and 3
    assert assemble.row_channels(B, 4) is None
    assert assemble.row_channels(None, 4).numel() == 0
