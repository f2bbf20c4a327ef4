"""What the peers do with BatchNorm in train mode, measured against the dense GGN.

For each net (Linear→BatchNorm1d→ReLU→Linear and a small CNN with BatchNorm2d, both in
train mode, float64, N = 16, cross-entropy) this records, per tool:

* the largest deviation of its GGN eigenvalues from ``eigvalsh`` of the brute-force
  GGN (``lowrank_ggn.reference.dense_ggn``), relative to λ_max;
* whether it raised, and the error;
* whether the model came back in train mode with unchanged BN running statistics.

Tools: lowrank_ggn, ViViT 1.0.0 (``EighComputation``, ``torch.symeig`` shimmed), BackPACK (``SqrtGGNExact``
and ``DiagGGNExact``), curvlinops (``GGNLinearOperator``, as given and with
``track_running_stats=False``), PyHessian (Hessian eigenvalues; only its effect on the
model is recorded, since it computes the Hessian, not the GGN).
Writes ``results/peers_batchnorm.json`` and ``.md``.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import torch
from harness.peers import vivit_eigh
from harness.results import write_results
from torch import nn

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.reference import dense_ggn

HERE = Path(__file__).resolve().parent
D = torch.float64
N = 16


def nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    )
    gen = torch.Generator().manual_seed(1)
    return {
        "mlp-bn1d": (mlp.to(D).train(), torch.randn(N, 6, generator=gen, dtype=D)),
        "cnn-bn2d": (
            cnn.to(D).train(),
            torch.randn(N, 2, 6, 6, generator=gen, dtype=D),
        ),
    }


def state(model):
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def copy_or_none(t):
        return None if t is None else t.clone()

    return model.training, [
        (copy_or_none(m.running_mean), copy_or_none(m.running_var)) for m in bn
    ]


def unchanged(before, model) -> bool:
    train, stats = state(model)

    def same(a, b):
        return (a is None and b is None) or (
            a is not None and b is not None and torch.equal(a, b)
        )

    return train == before[0] and all(
        same(a, c) and same(b, d) for (a, b), (c, d) in zip(before[1], stats)
    )


def deviation(evals, exact) -> float:
    evals = torch.as_tensor(evals, dtype=D).flatten().sort(descending=True).values
    n = min(evals.numel(), exact.numel())
    return ((evals[:n] - exact[:n]).abs().max() / exact[0]).item()


def t_lowrank(model, loss, X, y):
    return ggn_spectrum(model, loss, X, y).eigenvalues


def t_vivit(model, loss, X, y):
    return vivit_eigh(model, loss, X, y)


def t_backpack(model, loss, X, y):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, SqrtGGNExact

    model, loss = extend(model), extend(loss)
    with backpack(SqrtGGNExact(), DiagGGNExact()):
        loss(model(X), y).backward()
    V = torch.cat([p.sqrt_ggn_exact.flatten(2) for p in model.parameters()], dim=2)
    V = V.flatten(0, 1)  # [C·N, D]
    return torch.linalg.eigvalsh(V @ V.T)


def _curvlinops(model, loss, X, y):
    import numpy as np
    from curvlinops import GGNLinearOperator

    params = list(model.parameters())
    G = GGNLinearOperator(model, loss, params, [(X, y)]).to_scipy()
    dense = G @ np.eye(G.shape[0])
    return torch.linalg.eigvalsh(torch.from_numpy(dense))


def t_curvlinops(model, loss, X, y):
    return _curvlinops(model, loss, X, y)


def t_curvlinops_no_running_stats(model, loss, X, y):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return _curvlinops(model, loss, X, y)


def t_pyhessian(model, loss, X, y):
    from pyhessian import hessian

    comp = hessian(model, loss, data=(X, y), cuda=False)
    evals, _ = comp.eigenvalues(top_n=1)
    return None if not evals else None  # Hessian, not GGN: only the model state counts


TOOLS = {
    "lowrank_ggn": t_lowrank,
    "vivit": t_vivit,
    "backpack": t_backpack,
    "curvlinops": t_curvlinops,
    "curvlinops (track_running_stats=False)": t_curvlinops_no_running_stats,
    "pyhessian": t_pyhessian,
}


def main() -> None:
    torch.set_default_dtype(D)
    rows = []
    for net, (model0, X) in nets().items():
        y = torch.randint(0, 4, (N,), generator=torch.Generator().manual_seed(2))
        loss = nn.CrossEntropyLoss()
        exact = torch.linalg.eigvalsh(dense_ggn(model0, loss, X, y)).flip(0)
        for name, tool in TOOLS.items():
            model = copy.deepcopy(model0)
            before = state(model)
            row = {"net": net, "tool": name}
            try:
                evals = tool(model, copy.deepcopy(loss), X, y)
                if evals is not None:
                    row["rel_dev"] = deviation(evals, exact)
            except Exception as err:  # noqa: BLE001 - recording what the peer does
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
                row["trace"] = traceback.format_exc(limit=2)[-300:]
            # the track_running_stats=False variant is changed by us, on purpose
            row["model_unchanged"] = (
                unchanged(before, model) if "track" not in name else None
            )
            row["train_mode_after"] = model.training
            rows.append(row)
            print(row)
    lines = [
        "# Peers on BatchNorm in train mode (float64, N = 16, cross-entropy)",
        "",
        "| net | tool | max eigenvalue deviation / λ_max | error | model unchanged | train mode after |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        dev = f"{r['rel_dev']:.1e}" if "rel_dev" in r else "—"
        lines.append(
            f"| {r['net']} | {r['tool']} | {dev} | {r.get('error', '')} | "
            f"{ {True: 'yes', False: 'no', None: 'n/a'}[r['model_unchanged']] } | {r['train_mode_after']} |"
        )
    write_results(HERE / "results", "peers_batchnorm", rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
