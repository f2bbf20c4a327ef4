"""Layer coverage of the Gram engine: every captured module kind against autograd.

Two levels, in float64:

* each operand (``lowrank_ggn.core.engine.operands``) built from a real module call:
  its weight rows, its Kronecker form and its explicit chunks (smallest budget)
  against per-column weight gradients from autograd;
* each layer inside a model, on the per-sample path and upstream of a train-mode
  BatchNorm (full-batch path, every strategy): the Gram against the generic engine,
  its spectrum against the dense GGN, and the report says the layer was captured.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from utils import report_close

from lowrank_ggn import GGN, gram_matrix
from lowrank_ggn.core.engine import LayerTreatment, Strategy
from lowrank_ggn.core.engine.accumulate import symmetric_rank_k_update
from lowrank_ggn.core.engine.capture import capture, captured_layers
from lowrank_ggn.reference import dense_ggn

pytestmark = [
    # the reference engines' notes on speed, not on correctness
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]

D = torch.float64
#: float64 against autograd / the generic engine / the dense GGN, relative to the
#: largest entry or eigenvalue (measured worst case about 1e-14)
RTOL = 1e-10
CAPTURED = {LayerTreatment.KRONECKER, LayerTreatment.LOCAL_EXPLICIT}
SPLITS = {LayerTreatment.SPLIT, LayerTreatment.SPLIT_KRONECKER}


class MyLinear(nn.Linear):
    """A Linear subclass that keeps Linear's forward (like attention's out_proj)."""


class Bag(nn.Module):
    """An ``EmbeddingBag`` fed from ``[N, L]`` tokens, in one of three call styles."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        mode = "mean" if style == "mean" else "sum"
        self.bag = nn.EmbeddingBag(7, 3, mode=mode, padding_idx=0)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.style == "mean":  # 2d input: one bag per row
            return self.bag(tokens)
        # per-sample weights, a function of the tokens (no parameters)
        weights = (tokens % 3 + 1).to(self.bag.weight.dtype) / 2
        if self.style == "weighted":
            return self.bag(tokens, per_sample_weights=weights)
        N, L = tokens.shape  # 1d input with offsets, trailing bag empty-free
        offsets = torch.arange(0, N * L, L)
        return self.bag(tokens.flatten(), offsets, weights.flatten())


#: name -> (layer constructor, input shape or ("tokens", shape), channel dim of the
#: output for BatchNorm, or None: flatten first)
LAYERS = {
    "conv1d-groups-circular": (
        lambda: nn.Conv1d(
            4, 6, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="circular"
        ),
        (4, 11),
        1,
    ),
    "conv1d-same-reflect": (
        lambda: nn.Conv1d(3, 3, 4, padding="same", padding_mode="reflect"),
        (3, 7),
        1,
    ),
    "conv2d-depthwise-replicate": (
        lambda: nn.Conv2d(
            3, 6, 3, groups=3, padding=1, padding_mode="replicate", stride=(1, 2)
        ),
        (3, 5, 5),
        2,
    ),
    "conv2d-same-dilated": (
        lambda: nn.Conv2d(2, 4, (3, 2), padding="same", dilation=(2, 1)),
        (2, 5, 4),
        2,
    ),
    "conv2d-groups-stride-nobias": (
        lambda: nn.Conv2d(4, 4, 2, stride=2, groups=2, bias=False),
        (4, 4, 5),
        2,
    ),
    "conv3d-groups": (
        lambda: nn.Conv3d(
            2,
            4,
            (2, 3, 2),
            stride=(1, 2, 1),
            padding=(1, 0, 1),
            groups=2,
            dilation=(1, 1, 2),
        ),
        (2, 3, 5, 4),
        3,
    ),
    "convT1d-groups": (
        lambda: nn.ConvTranspose1d(
            4, 6, 3, stride=2, padding=1, output_padding=1, groups=2
        ),
        (4, 4),
        1,
    ),
    "convT2d-stride-dilation": (
        lambda: nn.ConvTranspose2d(
            2,
            3,
            (3, 2),
            stride=(2, 3),
            padding=(1, 0),
            output_padding=(1, 2),
            dilation=(1, 2),
        ),
        (2, 3, 2),
        2,
    ),
    "convT2d-output-padding-beyond-stride": (
        lambda: nn.ConvTranspose2d(2, 2, 3, dilation=2, output_padding=1),
        (2, 2, 3),
        2,
    ),
    "convT3d-groups": (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2),
        (2, 2, 1, 2),
        3,
    ),
    "linear-subclass-positions": (lambda: MyLinear(3, 4), (2, 3, 3), None),
    "embedding-padding": (
        lambda: nn.Embedding(5, 3, padding_idx=0),
        ("tokens", (4,)),
        None,
    ),
    "embedding-bag-mean": (lambda: Bag("mean"), ("tokens", (4,)), None),
    "embedding-bag-weighted": (lambda: Bag("weighted"), ("tokens", (4,)), None),
    "embedding-bag-offsets": (lambda: Bag("offsets"), ("tokens", (3,)), None),
    "layernorm-last-two": (lambda: nn.LayerNorm((2, 3)), (3, 2, 3), None),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3, 2), 2),
    "rmsnorm": (lambda: nn.RMSNorm(4), (3, 4), None),
}


def _inputs(spec, N: int, gen: torch.Generator) -> Tensor:
    if spec[0] == "tokens":  # token 0 is padding; few tokens: many repeats
        return torch.randint(0, 5, (N, *spec[1]), generator=gen)
    return torch.randn(N, *spec, generator=gen, dtype=D)


def _model(name: str, batch_norm: bool) -> tuple[nn.Module, Tensor, Tensor]:
    """``layer → [BatchNorm] → tanh → flatten → Linear(·, 3)``, inputs, CE targets."""
    build, spec, channel_dim = LAYERS[name]
    torch.manual_seed(sum(map(ord, name)))
    gen = torch.Generator().manual_seed(7)
    N = 6
    layer = build().to(D)
    X = _inputs(spec, N, gen)
    with torch.no_grad():
        out = layer(X)
    norm: list[nn.Module] = []
    if batch_norm and channel_dim is not None:  # directly on the layer's channels
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[out.dim() - 3]
        norm = [bn(out.shape[1])]
    features = out[0].numel()
    tail: list[nn.Module] = [nn.Tanh(), nn.Flatten()]
    if batch_norm and channel_dim is None:
        tail.append(nn.BatchNorm1d(features))
    model = nn.Sequential(layer, *norm, *tail, nn.Linear(features, 3)).to(D)
    return model, X, torch.randint(0, 3, (N,), generator=gen)


def _layer_name(model: nn.Module) -> str:
    return "0.bag" if isinstance(model[0], Bag) else "0"


def _assert_exact(model, X, y, strategy=None) -> GGN:
    loss = nn.CrossEntropyLoss()
    ggn = GGN(model, loss, X, y, strategy=strategy)
    gram = ggn.gram()
    report_close(gram, gram_matrix(model, loss, X, y, engine="generic"), RTOL, "Gram")
    dense = torch.linalg.eigvalsh(dense_ggn(model, loss, X, y)).flip(0)
    ours = torch.linalg.eigvalsh(gram).flip(0)
    r = min(ours.numel(), dense.numel())
    report_close(ours[:r], dense[:r], RTOL, "eigenvalues")
    return ggn


@pytest.mark.parametrize("name", LAYERS)
def test_layer_on_the_per_sample_path(name):
    model, X, y = _model(name, batch_norm=False)
    ggn = _assert_exact(model, X, y)
    report = ggn.engine_report
    assert report.strategy is Strategy.PER_SAMPLE, report
    assert report.layers[_layer_name(model)] in CAPTURED, report
    # nothing generic: no per-sample VJP pass for any parameter
    assert LayerTreatment.GENERIC not in report.layers.values(), report


@pytest.mark.parametrize("strategy", [None, "bn_split", "columns", "streamed"], ids=str)
@pytest.mark.parametrize("name", LAYERS)
def test_layer_upstream_of_train_mode_batchnorm(name, strategy):
    model, X, y = _model(name, batch_norm=True)
    ggn = _assert_exact(model, X, y, strategy)
    report = ggn.engine_report
    assert report.fallback is None, report
    expected = {
        None: CAPTURED | SPLITS | {LayerTreatment.MIXING},
        "bn_split": SPLITS,  # every parameter captured: it applies
        "columns": {LayerTreatment.MIXING},
        "streamed": set(),  # keeps no per-layer data
    }[strategy]
    assert report.layers.get(_layer_name(model)) in expected | {None}, report
    # under columns, BatchNorm's own affine parameters take generic rows
    norms = tuple(
        f"{n}."
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    generic = [n for n, t in report.layers.items() if t is LayerTreatment.GENERIC]
    assert all(n.startswith(norms) for n in generic), report


# ------------------------------------------------------------------ operands alone
def _operand_case(name: str):
    """A layer record after one call, random column gradients and autograd's rows."""
    build, spec, _ = LAYERS[name]
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    module = build().to(D)
    X = _inputs(spec, 4, gen)
    (layer,) = captured_layers(module, {id(p) for p in module.parameters()})
    with capture([layer], []):
        y = module(X)
    assert layer.prepare(4)
    C = 2
    g = torch.randn(4, C, *y.shape[1:], generator=gen, dtype=D)  # [NS, C, *out]
    rows = []
    for n in range(4):
        for c in range(C):
            cot = torch.zeros_like(y)
            cot[n] = g[n, c]
            (w,) = torch.autograd.grad(y, layer.weight, cot, retain_graph=True)
            rows.append(w.flatten())
    return layer, y, g, torch.stack(rows)  # V: [NC, numel]


@pytest.mark.parametrize("name", LAYERS)
def test_operand_forms_equal_autograd(name):
    layer, y, g, V = _operand_case(name)
    operand = layer.operand
    gm = layer.output_grad(g)  # [NS, C, P, O]
    NC = V.shape[0]
    # explicit rows in the smallest chunks (one leading weight row, or one token)
    gram = torch.zeros(NC, NC, dtype=D)
    for cols, rows in operand.explicit(gm, budget=1):
        report_close(rows, V[:, cols], RTOL, "explicit chunk")
        symmetric_rank_k_update(gram, rows)
    report_close(gram, V @ V.T, RTOL, "explicit Gram")
    if LayerTreatment.KRONECKER in operand.costs(4, 2, 8):
        gram = torch.zeros(NC, NC, dtype=D)
        operand.add_kronecker(gram, gm)
        report_close(gram, V @ V.T, RTOL, "Kronecker Gram")
    # full-batch columns: Σ_n over the samples, as for statistics directions
    full = g.transpose(0, 1)  # [C, NS, *out]: column c holds every sample
    summed = V.reshape(4, 2, -1).sum(0)
    report_close(operand.weight_rows(layer.output_grad(full)), summed, RTOL, "rows")


def test_explicit_cost_counts_forming_the_rows():
    """A dense weight's explicit rows cost ``NC·P·D_l`` to form (each entry a sum over
    the ``P`` positions) plus ``(NC)²·D_l/2`` for ``syrk``."""
    layer, y, g, V = _operand_case("conv2d-groups-stride-nobias")
    _, G, P, Ig = layer.operand.A.shape
    D_l = layer.weight.numel()
    NS, C = 4, 2
    flops, memory = layer.operand.costs(NS, C, 8)[LayerTreatment.LOCAL_EXPLICIT]
    assert flops == NS * C * P * D_l + (NS * C) ** 2 * D_l / 2 and memory == 0.0


def test_embedding_kronecker_uses_index_matches():
    """The kernel of an embedding is the equality of token ids, padding excluded."""
    layer, _, _, _ = _operand_case("embedding-padding")
    op = layer.operand
    kernel = op._kernel(D)(0)  # sample 0 against samples 0..3: [4, P, P]
    idx = op.idx[:, :, 0]
    expected = (idx[:, :, None] == idx[0][None, None, :]) & (idx[0] != 0)
    expected &= (idx != 0)[:, :, None]
    assert torch.equal(kernel, expected.to(D))


# ------------------------------------------------------------ what stays generic
def test_transformer_layer_captures_everything_attention_projections_included():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3)).to(D)
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(5, 3, 4, generator=gen, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    report = _assert_exact(model, X, y).engine_report
    # MultiheadAttention's projections run inside F.multi_head_attention_forward,
    # which the capture opens up for self-attention (core/engine/attention.py)
    attention = ("0.self_attn.in_proj_weight", "0.self_attn.out_proj")
    for name in ("0.linear1", "0.linear2", "0.norm1", "0.norm2", "2", *attention):
        assert report.layers[name] in CAPTURED, report
    assert LayerTreatment.GENERIC not in report.layers.values(), report


def test_linear_subclass_with_its_own_forward_is_checked():
    """Captured on trust; the self-check finds the wrong formula, generic instead."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, 2.0 * self.weight, self.bias)

    torch.manual_seed(5)
    model = nn.Sequential(Scaled(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    X, y = torch.randn(5, 3, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    report = _assert_exact(model, X, y).engine_report
    assert report.strategy is Strategy.PER_SAMPLE
    assert report.layers["0.weight"] is LayerTreatment.GENERIC, report
    assert report.layers["2"] in CAPTURED
    assert "differ from autograd" in report.reasons["0"] and report.fallback is None


def test_layer_whose_first_dimension_is_not_the_batch_stays_generic():
    """Sequence-first ``[T, N, I]``: no per-sample formula, autograd instead."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):  # x: [N, T, 3]
            return self.fc(x.transpose(0, 1)).transpose(0, 1).flatten(1)

    torch.manual_seed(6)
    model = SeqFirst().to(D)
    X, y = torch.randn(5, 4, 3, dtype=D), torch.tensor([0, 1, 2, 3, 4])
    report = _assert_exact(model, X, y).engine_report
    assert report.layers["fc.weight"] is LayerTreatment.GENERIC, report


@pytest.mark.parametrize("batch_norm", [False, True], ids=["per-sample", "bn"])
@pytest.mark.parametrize("name", ["embedding-padding", "conv2d-depthwise-replicate"])
def test_subsampled_columns(name, batch_norm):
    """Curvature of a subset of the batch: operands restricted to those samples."""
    model, X, y = _model(name, batch_norm)
    loss, keep = nn.CrossEntropyLoss(), [0, 2, 5]
    strategy = "bn_split" if batch_norm else None  # the statistics reach every sample
    ggn = GGN(model, loss, X, y, subsampling=keep, strategy=strategy)
    generic = gram_matrix(model, loss, X, y, subsampling=keep, engine="generic")
    report_close(ggn.gram(), generic, RTOL, "subsampled Gram")
    assert ggn.engine_report.layers["0"] in CAPTURED | SPLITS
