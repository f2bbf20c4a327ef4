"""The capture's function mode: functional calls captured, checked, or left generic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zoo_patterns
from torch import nn
from utils import RTOL, assert_state_equal, report_close, state_of

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.engine import LayerTreatment, Strategy
from lowrank_ggn.reference import dense_ggn, dense_ggn_eigenvalues

D = torch.float64
GENERIC = LayerTreatment.GENERIC


def _check(model, loss, X, y, generic=(), strategy=None):
    """Exact against the dense GGN, state unchanged; the generic names as given."""
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y, strategy=strategy)
    assert_state_equal(before, model)
    report = res.engine_report
    assert report.fallback is None and report.strategy is not Strategy.GENERIC
    found = {n for n, t in report.layers.items() if t is GENERIC}
    assert found == set(generic), report
    G = dense_ggn(model, loss, X, y)
    expected = torch.linalg.eigvalsh(G).flip(0)[: res.eigenvalues.numel()]
    report_close(res.eigenvalues, expected, name="eigenvalues")
    return report


class FunctionalNet(nn.Module):
    """Parameters used through ``F.linear``, ``addmm``, ``F.group_norm`` by a parent."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4) * 0.5)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.gn_w = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.gn_b = nn.Parameter(0.1 * torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 3) * 0.5)  # stored [in, out]
        self.b2 = nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):
        h = F.linear(x, self.w1, self.b1)  # [N, T, 6]
        h = F.group_norm(h.transpose(1, 2), 2, self.gn_w, self.gn_b).transpose(1, 2)
        h = torch.tanh(h)
        out = torch.addmm(self.b2, h.reshape(-1, 6), self.w2)
        return out.view(x.shape[0], -1).sum(-1, keepdim=True) * torch.ones(
            1, 3
        ) + out.view(x.shape[0], -1, 3).mean(1)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_functional_calls_are_captured(batch_norm):
    torch.manual_seed(0)
    body = FunctionalNet()
    model = nn.Sequential(body, nn.BatchNorm1d(3)) if batch_norm else body
    model = model.to(D)
    X, y = torch.randn(5, 4, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    report = _check(model, nn.CrossEntropyLoss(), X, y)
    prefix = "0." if batch_norm else ""
    for name in ("w1", "w2", "gn_w"):
        assert report.layers[prefix + name] is not GENERIC


class SequenceFirst(nn.Module):
    """``F.linear`` on ``[T, N, I]``: its rows are not sample-major."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4) * 0.5)
        self.head = nn.Linear(3 * 5, 3)

    def forward(self, x):  # x [N, T=5, 4]
        h = F.linear(x.transpose(0, 1), self.w)  # [T, N, 3]
        return self.head(torch.tanh(h).transpose(0, 1).reshape(x.shape[0], -1))


def test_a_call_whose_rows_differ_from_autograd_goes_generic_alone():
    """The self-check names the mismatching parameter: only that call is generic."""
    torch.manual_seed(1)
    model = SequenceFirst().to(D)
    X, y = torch.randn(5, 5, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    report = _check(model, nn.CrossEntropyLoss(), X, y, generic={"w"})
    assert report.layers["head"] is LayerTreatment.KRONECKER


class Float32Inside(nn.Module):
    """A float64 model that normalises in float32 (T5/Llama RMSNorm, EvoNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        rms = h.float().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt().to(h.dtype)
        return self.head(torch.tanh(self.weight * (h * rms)))


#: Agreement of a model that computes in float32 inside: float32 round-off.
RTOL_FLOAT32_INSIDE = 1e-5


def test_float32_inside_a_float64_model_stays_on_the_fast_path():
    torch.manual_seed(2)
    model = Float32Inside().to(D)
    X, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    res = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
    report = res.engine_report
    assert report.fallback is None and report.strategy is Strategy.PER_SAMPLE
    assert not any(t is GENERIC for t in report.layers.values()), report
    exact = dense_ggn_eigenvalues(model, nn.CrossEntropyLoss(), X, y)
    k = res.eigenvalues.numel()
    err = (res.eigenvalues - exact[:k]).abs().max() / exact[0]
    assert err <= RTOL_FLOAT32_INSIDE, f"{err:.2e}"


def test_broadcast_parameters_and_norms_train_mode_bn():
    """Layer scale, LayerNorm2d, position table, T5 norm with train-mode BN before."""
    model, loss, X, y = zoo_patterns.convnextish(7)
    model.norm = nn.Sequential(nn.BatchNorm2d(3), model.norm).to(D)
    report = _check(model, loss, X, y)
    for name in ("gamma", "pos", "t5", "norm.1"):
        assert report.layers[name] is not GENERIC, report


class SlicedTable(nn.Module):
    """Tokens plus ``pos[index]`` (the harness transformer's ``self.pos[:L]``)."""

    def __init__(self, index, length: int = 4) -> None:
        super().__init__()
        self.index = index
        self.tok = nn.Embedding(5, 3)
        self.pos = nn.Parameter(0.5 * torch.randn(length, 3))
        self.head = nn.Linear(3 * 4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x) + self.pos[self.index]).flatten(1))


@pytest.mark.parametrize(
    "index, length, generic",
    [
        (slice(None, 4), 4, ()),  # all of the table, in order: captured
        (slice(None), 4, ()),
        (torch.tensor([1, 0, 3, 2]), 4, {"pos"}),  # every row, permuted: autograd's
        (slice(1, 5), 5, {"pos"}),  # part of a longer table
    ],
    ids=["prefix", "full", "permuted", "part"],
)
def test_position_table_read_through_a_slice(index, length, generic):
    """Exact either way; captured only where the slice reads the whole table in order."""
    torch.manual_seed(0)
    model = SlicedTable(index, length).to(D)
    gen = torch.Generator().manual_seed(1)
    X = torch.randint(0, 5, (6, 4), generator=gen)
    y = torch.randint(0, 2, (6,), generator=gen)
    _check(model, nn.CrossEntropyLoss(), X, y, generic=generic)


def test_parameter_also_read_by_an_uncaptured_call_is_generic():
    """``x * s + exp(s)``: the second read is no captured call, so ``s`` is generic."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.s = nn.Parameter(torch.rand(3) + 0.5)

        def forward(self, x):
            h = self.fc(x)
            return h * self.s + self.s.exp()

    torch.manual_seed(3)
    model = Twice().to(D)
    X, y = torch.randn(5, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    report = _check(model, nn.CrossEntropyLoss(), X, y, generic={"s"})
    assert "also read outside" in report.reasons["s"]


class Reused(nn.Module):
    """One ``Linear`` run at every depth (ALBERT), and a scale read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = nn.Linear(5, 5)
        self.s = nn.Parameter(torch.rand(5) + 0.5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.block(h)) * self.s + self.s
        return self.out(h)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_reused_layers_and_tied_embeddings_are_shared(batch_norm):
    """Every read captured: rows summed over the uses, exact, no generic rows."""
    torch.manual_seed(4)
    model = Reused()
    if batch_norm:
        model.inp = nn.Sequential(model.inp, nn.BatchNorm1d(5))
    model = model.to(D)
    X, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    report = _check(model, nn.CrossEntropyLoss(), X, y)
    shared = {n for n, t in report.layers.items() if t is LayerTreatment.SHARED}
    assert {"block", "block#1", "block#2", "s"} <= shared, report
    # tied input and output embeddings, on both paths
    lm, loss, tokens, labels = zoo_patterns.tied_lm(60, N=2)
    report = _check(lm, loss, tokens, labels, generic={"wpe.weight"})
    assert report.layers["wte"] is LayerTreatment.SHARED
    assert report.layers["lm_head"] is LayerTreatment.SHARED


def test_ratio_of_a_forced_strategy_is_exact_with_functional_layers():
    """bn_split through functional layers below a train-mode BatchNorm."""
    model, loss, X, y = zoo_patterns.convnextish(8)
    model.stem = nn.Sequential(model.stem, nn.BatchNorm2d(3)).to(D)
    for strategy in ("bn_split", "columns"):
        report = _check(model, loss, X, y, strategy=strategy)
        assert report.strategy.value == strategy
    assert RTOL > 0


class FlatTokensBN(nn.Module):
    """BatchNorm over tokens flattened into the batch dimension (LeViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):  # [N, T=5, 3]
        h = self.fc(x)
        h = self.bn(h.flatten(0, 1)).reshape(h.shape)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batchnorm_on_flattened_tokens_is_left_to_autograd_alone(train):
    torch.manual_seed(5)
    model = FlatTokensBN().to(D).train(train)
    model.bn.running_mean.normal_(0, 0.3)
    X, y = torch.randn(4, 5, 3, dtype=D), torch.tensor([0, 1, 2, 0])
    res = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
    report = res.engine_report
    assert report.fallback is None and report.strategy is not Strategy.GENERIC
    assert "not the batch" in report.reasons["bn"]
    assert report.layers["head"] is not GENERIC
    exact = dense_ggn_eigenvalues(model, nn.CrossEntropyLoss(), X, y)
    report_close(res.eigenvalues, exact[: res.eigenvalues.numel()], name="eigenvalues")


class PositionsOfLengthN(nn.Module):
    """A position table indexed by ``arange(T)`` with ``T = N``: not a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(3, 4)
        self.pos = nn.Embedding(4, 4)
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, x):  # [N, T, 3]
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(torch.tanh(h).flatten(1))


def test_layer_whose_formula_fails_goes_generic_alone():
    """``pos`` looks batched when ``T = N``; the self-check sends it alone to autograd."""
    torch.manual_seed(6)
    model = PositionsOfLengthN().to(D)
    X, y = torch.randn(4, 4, 3, dtype=D), torch.tensor([0, 1, 2, 0])
    report = _check(model, nn.CrossEntropyLoss(), X, y, generic={"pos.weight"})
    assert "differ from autograd" in report.reasons["pos"]
    assert report.layers["tok"] is not GENERIC


class Checkpointed(nn.Module):
    """Blocks under ``torch.utils.checkpoint`` (both variants), BatchNorm inside."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.block1 = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh())
        self.block2 = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.block1, x, use_reentrant=self.reentrant)
        h = checkpoint(self.block2, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_is_exact_on_the_fast_path(reentrant):
    torch.manual_seed(7)
    model = Checkpointed(reentrant).to(D)
    X, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    report = _check(model, nn.CrossEntropyLoss(), X, y)
    assert report.strategy is Strategy.BN_SPLIT or report.strategy is Strategy.COLUMNS
    # the patch is undone: checkpointing recomputes again after the call
    import torch.utils.checkpoint as ckpt

    assert ckpt.CheckpointFunction.__name__ == "CheckpointFunction"


@pytest.mark.parametrize("filled", [True, False], ids=["stale-cache", "empty-cache"])
def test_parameter_caches_are_neither_read_stale_nor_left_changed(filled):
    """LeViT's attention-bias cache: filled by the user's own no_grad pass, or empty."""
    torch.manual_seed(8)
    model = zoo_patterns.CachedBias().to(D).eval()
    X, y = torch.randn(5, 3, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    if filled:
        with torch.no_grad():
            model(X)  # the user's eval pass caches a tensor without a graph
    cache = model.attention_bias_cache
    content = dict(cache)
    import copy

    twin = copy.deepcopy(model).train()  # no cache: the same function from the table
    twin.attention_bias_cache = {}
    res = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
    G = dense_ggn(twin, nn.CrossEntropyLoss(), X, y)
    expected = torch.linalg.eigvalsh(G).flip(0)[: res.eigenvalues.numel()]
    report_close(res.eigenvalues, expected, name="eigenvalues")
    assert model.attention_bias_cache is cache and cache.keys() == content.keys()
    assert all(v is content[k] for k, v in cache.items())
    assert not any(v.requires_grad for v in cache.values())


class Attention(nn.Module):
    """``nn.MultiheadAttention`` as models use it: self-attention with masks, or
    cross-attention to a second sequence, batch-first or sequence-first."""

    def __init__(self, batch_first: bool, cross: bool, bias: bool = True) -> None:
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.proj = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        h = torch.tanh(self.proj(x))  # [N, T, 8]
        h = h if self.batch_first else h.transpose(0, 1)
        kv = h.flip(1 if self.batch_first else 0) if self.cross else h
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        out, weights = self.attn(
            h, kv, kv, key_padding_mask=mask, attn_mask=causal, need_weights=True
        )
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1)) + weights.sum((1, 2))[:, None]


@pytest.mark.parametrize(
    "batch_first, cross, bias",
    [
        (True, False, True),
        (False, False, True),
        (True, False, False),
        (True, True, True),
    ],
    ids=["batch-first", "sequence-first", "no-bias", "cross-attention"],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_attention_projections_are_captured(batch_first, cross, bias, train):
    """Self-attention's packed in-projection and out-projection get rows (no per-sample
    VJPs), exact; cross-attention stays generic (its in-projection is split)."""
    torch.manual_seed(0)
    model = Attention(batch_first, cross, bias).to(D).train(train)
    X = torch.randn(5, 4, 3, dtype=D)
    mask = torch.zeros(5, 4, dtype=torch.bool)
    mask[1, 3] = mask[3, 2:] = True  # padding, never a whole row
    y = torch.tensor([0, 1, 2, 1, 0])
    names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    generic = {f"attn.{n}" for n in names if bias or "bias" not in n} if cross else ()
    report = _check(model, nn.CrossEntropyLoss(), (X, mask), y, generic=generic)
    if not cross:
        assert "attn.in_proj_weight" in report.layers
        assert "attn.out_proj" in report.layers
