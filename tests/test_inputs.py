"""Tuple and dict inputs, ``batch_size=``, and the reverse-mode path check on models
without forward-mode AD or ``vmap`` rules (GRU, attention), against the dense reference."""

from __future__ import annotations

import warnings

import pytest
import real_models
import torch
from cases import DTYPE
from torch import nn
from utils import assert_spectrum_matches, assert_state_equal, state_of

from lowrank_ggn import GGN, audit_structure, ggn_spectrum, gram_matrix
from lowrank_ggn.core.autodiff import vmappable
from lowrank_ggn.core.inputs import ModelInputs, as_inputs
from lowrank_ggn.reference import dense_ggn


def _spectrum_matches_dense(model, loss, inputs, y, path, **kwargs):
    before = state_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ggn_spectrum(model, loss, inputs, y, **kwargs)
    assert_state_equal(before, model)
    assert res.path.name == path, res.path
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, inputs, y))
    return res


def test_model_inputs_split_shared_and_select():
    x, ids = torch.randn(5, 3, dtype=DTYPE), torch.arange(5)
    table = torch.randn(4, dtype=DTYPE)
    view = ModelInputs({"x": x, "ids": ids, "table": table, "flag": None, "s": 0.5})
    assert view.size == 5 and view.split == [True, True, False, False, False]
    part = view.select([4, 0])
    assert part.size == 2 and torch.equal(part.raw["x"], x[[4, 0]])
    assert part.raw["table"] is table and part.raw["s"] == 0.5
    assert view[1:3].size == 2 and torch.equal(view[1:3].raw["ids"], ids[1:3])
    args, kwargs = view.call_args()
    assert args == () and set(kwargs) == {"x", "ids", "table", "flag", "s"}
    assert view.to(torch.float32).raw["table"].dtype == torch.float32
    assert view.to(torch.float32).raw["ids"].dtype == torch.int64
    # tuples are positional; the first tensor entry defines N unless batch_size says
    assert ModelInputs((table, x)).size == 4
    assert ModelInputs((table, x), batch_size=5).split == [False, True]
    assert as_inputs(view) is view


@pytest.mark.parametrize(
    "raw, kwargs, error, match",
    [
        ({1: torch.zeros(3)}, {}, TypeError, "must have str keys"),
        ({"a", "b"}, {}, TypeError, "a tuple .passed positionally. or a dict"),
        ((0.5, None), {}, ValueError, "must hold a tensor with the batch in dim 0"),
        ((torch.zeros(3, 2),), {"batch_size": 4}, ValueError, "no tensor entry has 4"),
        ((torch.zeros(3, 2),), {"batch_size": 0}, ValueError, "batch_size must be"),
    ],
)
def test_model_inputs_errors_name_the_fix(raw, kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelInputs(raw, **kwargs)


def test_entry_of_the_wrong_dtype_is_named_before_the_forward_pass():
    model, loss, inputs, y = real_models.keyword_model(41)
    inputs = {**inputs, "extra": inputs["extra"].float()}
    before = state_of(model)
    with pytest.raises(ValueError, match=r"inputs\['extra'\] has dtype torch.float32"):
        gram_matrix(model, loss, inputs, y)
    assert_state_equal(before, model)


def test_batch_size_override_when_a_shared_tensor_comes_first():
    model, loss, inputs, y = real_models.keyword_model(41)
    shared_first = {"table": inputs["table"], **inputs}  # table [6] first, N = 5
    with pytest.raises(ValueError, match="batch"):
        gram_matrix(model, loss, shared_first, y)  # N taken as 6 from the table
    K = gram_matrix(model, loss, shared_first, y, batch_size=5)
    torch.testing.assert_close(K, gram_matrix(model, loss, inputs, y))
    ggn = GGN(model, loss, shared_first, y, batch_size=5, subsampling=[0, 3])
    assert ggn.gram().shape == (2 * 3, 2 * 3)


class GRUClassifier(nn.Module):
    """Token ids -> embedding -> GRU -> last hidden state -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        _, h = self.gru(self.embed(tokens))
        return self.head(h[-1])


def test_gru_takes_the_per_sample_path_one_sample_at_a_time():
    torch.manual_seed(0)
    model = GRUClassifier().to(DTYPE)
    assert not vmappable(model)
    tokens, y = torch.randint(0, 6, (5, 4)), torch.tensor([0, 1, 2, 0, 1])
    res = _spectrum_matches_dense(
        model, nn.CrossEntropyLoss(), tokens, y, "per_sample", eigenvectors=True
    )
    G = dense_ggn(model, nn.CrossEntropyLoss(), tokens, y)
    E, lam = res.eigenvectors, res.eigenvalues
    assert (G @ E.T - E.T * lam).norm(dim=0).max() <= 1e-8 * lam[0]


class AttentionOverTheBatch(nn.Module):
    """``batch_first=False`` fed ``[N, T, E]``: attention runs over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(1))


def test_attention_that_mixes_samples_takes_the_full_batch_path():
    torch.manual_seed(0)
    model = AttentionOverTheBatch().to(DTYPE)
    X, y = torch.randn(5, 3, 4, dtype=DTYPE), torch.tensor([0, 1, 1, 0, 1])
    _spectrum_matches_dense(model, nn.CrossEntropyLoss(), X, y, "full_batch")
    report = audit_structure(model, nn.CrossEntropyLoss(), X, y)
    assert not report.sample_independent


class UnmaskedPooling(real_models.TokenTransformer):
    """Eval mode, nested tensors on, pooling over padded positions too."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 1)

    def forward(self, tokens, padding_mask):
        h = self.encoder(self.embed(tokens), src_key_padding_mask=padding_mask)
        return self.head(h.mean(1))


def test_eval_mode_transformer_is_one_function_throughout():
    """Without grad, PyTorch's fused inference path zeroes padded positions: every
    pass of lowrank_ggn (and of the reference) uses the differentiated kernels."""
    torch.manual_seed(0)
    model = UnmaskedPooling().to(DTYPE).eval()
    _, loss, inputs, y = real_models.token_transformer(40)
    _spectrum_matches_dense(model, loss, inputs, y, "per_sample")
    report = audit_structure(model, loss, inputs, y)
    assert report.sample_independent and report.deterministic
