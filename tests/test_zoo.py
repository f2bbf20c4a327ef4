"""Real models as timm and transformers build them, raw, against the dense reference.

Skipped when timm or transformers is not installed (``make test`` installs them).
Every model runs in train and eval mode, in float64, with random weights: the top-10
eigenvalues and the trace of the GGN within ``ZOO_RTOL·λ_max`` of
:func:`~lowrank_ggn.reference.dense_ggn_eigenvalues`, the model's state unchanged,
and the fast path: no fallback, and no parameter left generic except those that
need it (position tables indexed the same for the whole batch).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_state_equal, state_of
from zoo_imports import zoo

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.engine import LayerTreatment, Strategy
from lowrank_ggn.reference import dense_ggn_eigenvalues

timm, transformers = zoo()

F64 = torch.float64
#: Relative agreement with the dense reference (the bar of the model-zoo issue).
ZOO_RTOL = 1e-8
N = 4


def _timm(name: str):
    def build():
        model = timm.create_model(name, num_classes=3).to(F64)
        gen = torch.Generator().manual_seed(1)
        X = torch.randn(N, 3, 32, 32, generator=gen, dtype=F64)
        return model, torch.nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 2, 1])

    return build


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg).to(F64)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 30, (N, 6), generator=gen)
    return model, torch.nn.CrossEntropyLoss(), tokens, torch.tensor([0, 1, 2, 1])


def causal_lm_loss(logits, labels):
    """Hugging Face's causal-LM loss: shifted labels, ``ignore_index=-100``."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg).to(F64)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (N, 5), generator=gen)
    labels = tokens.clone()
    labels[0, 3:] = -100  # padding
    return model, causal_lm_loss, tokens, labels


#: name -> (builder, parameters that stay generic)
ZOO = {
    "timm-efficientnet": (_timm("test_efficientnet"), set()),
    "timm-mobilenetv3": (_timm("mobilenetv3_small_050"), set()),
    "timm-resnet": (_timm("test_resnet"), set()),
    "timm-convnext": (_timm("test_convnext"), set()),
    # at 32×32 the position table is resampled (a function of it) and the class
    # token is expanded and concatenated: both need per-sample VJPs
    "timm-vit": (_timm("test_vit"), {"cls_token", "pos_embed"}),
    # the position table is indexed by [1, T] positions, shared by the batch
    "hf-bert": (_bert, {"bert.embeddings.position_embeddings.weight"}),
    # the position table likewise (the token table, tied to the output projection,
    # is shared: captured at both uses)
    "hf-gpt2": (_gpt2, {"transformer.wpe.weight"}),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_is_exact_on_the_fast_path(name, train):
    build, allowed_generic = ZOO[name]
    torch.manual_seed(0)
    model, loss, X, y = build()
    model.train(train)
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y)
    assert_state_equal(before, model)
    report = res.engine_report
    assert report.fallback is None, report.fallback
    assert report.strategy is not Strategy.GENERIC, report
    generic = {n for n, t in report.layers.items() if t is LayerTreatment.GENERIC}
    assert generic <= allowed_generic, generic - allowed_generic
    exact = dense_ggn_eigenvalues(model, loss, X, y)
    assert_state_equal(before, model)
    scale = exact[0].item()
    k = min(10, res.eigenvalues.numel())
    top = (res.eigenvalues[:k] - exact[:k]).abs().max().item()
    assert top <= ZOO_RTOL * scale, f"top-{k} off by {top / scale:.2e}·λ_max"
    trace = abs(res.eigenvalues.sum().item() - exact.sum().item())
    assert trace <= ZOO_RTOL * scale, f"trace off by {trace / scale:.2e}·λ_max"


@pytest.mark.parametrize("name", ["timm-vit", "hf-bert"])
def test_gradient_checkpointing_as_the_libraries_enable_it(name):
    """timm's ``set_grad_checkpointing``, Hugging Face's activation checkpointing."""
    build, allowed_generic = ZOO[name]
    torch.manual_seed(0)
    model, loss, X, y = build()
    if name.startswith("timm"):
        model.set_grad_checkpointing(True)
    else:  # transformers 5 renames it; the old name warns
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    model.train()
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y)
    assert_state_equal(before, model)
    assert res.engine_report.fallback is None
    # the reference on the same weights without checkpointing (Hugging Face's
    # enable_input_require_grads hook cannot run under torch.func's jacrev)
    torch.manual_seed(0)
    plain = build()[0].train()
    exact = dense_ggn_eigenvalues(plain, loss, X, y)
    k = min(10, res.eigenvalues.numel())
    top = (res.eigenvalues[:k] - exact[:k]).abs().max().item()
    assert top <= ZOO_RTOL * exact[0].item()
