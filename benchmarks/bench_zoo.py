r"""Models as the zoos build them: timm, Hugging Face transformers, torchvision's ResNet.

Parts (float32, random weights from a fixed seed, 2 threads unless ``--threads``):

* ``zoo``: every model of ``tests/test_zoo.py`` at a realistic small size (timm's
  ``test_*`` models and ``mobilenetv3_small_050`` on ``[8, 3, 64, 64]``; BERT and
  GPT-2 with the configs below), train and eval mode: time of
  ``ggn_spectrum(top_k=10)``, the engine's strategy, how many parameters stayed
  generic, peak RSS (GPT-2 with ``mc_samples=8``). The README's zoo table.
* ``resnet18``: torchvision's ResNet-18 (:mod:`harness.resnet`, in-place ReLUs, ``out +=
  identity``) in eval mode, ``[64, 3, 32, 32]``, ``CrossEntropyLoss``, C = 10: top-5
  eigenpairs, lowrank_ggn against curvlinops' ``GGNLinearOperator`` + ``eigsh(k=5)``.
* ``gpt2``: ``GPT2LMHeadModel`` (2 layers, d = 64, 4 heads, T = 32, V = 1,000, N = 8)
  with the causal-LM loss written as Hugging Face writes it (shifted labels,
  ``F.cross_entropy`` on the flattened positions), ``mc_samples`` 8 and 128 (64 and
  1,024 columns; the exact factors would be ``N·(T − 1)·V = 248,000`` columns): lowrank_ggn against the
  previous release (``--previous``, default ``86567df``), which needs a wrapper for
  the ``ModelOutput`` and the closed-form loss on ``[N, V, T − 1]`` shifted logits
  (the same function; it cannot factor the flattening callable without a
  ``[T·V, T·V]`` Hessian per sample). The two draw their Monte-Carlo columns
  differently, so their eigenvalues agree only statistically.
* ``lm50k``: the same GPT-2 at V = 50,257, T = 128, N = 4 with ``mc_samples=1`` and
  ``3``: time and peak RSS under the default memory budget.

Every (part, method, size) runs in a fresh subprocess so that its peak RSS is its own
(``harness.memory.measure`` after a warm-up on a small batch, except in quick
mode). Results: ``results/zoo_<device>.json`` and ``.md``.

Usage::

    python benchmarks/bench_zoo.py                        # every part
    python benchmarks/bench_zoo.py --only resnet18 gpt2
    python benchmarks/bench_zoo.py --quick --out /tmp/bz  # smoke run (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from harness.cli import add_run_options
from harness.machine import machine, machine_words
from harness.memory import measure
from harness.peers import available, curvlinops_eigsh
from harness.results import plain_data, rel_dev, write_results
from harness.workers import announce, outcome, previous_release, run_worker

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests"))  # zoo_imports: timm, transformers

PARTS = ("zoo", "resnet18", "gpt2", "lm50k")
PREVIOUS = "86567df"  # the release before the model-zoo work
ZOO_MODELS = (
    "test_efficientnet",
    "mobilenetv3_small_050",
    "test_resnet",
    "test_convnext",
    "test_vit",
    "bert",
    "gpt2",
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One worker run."""

    part: str
    method: str
    model: str
    N: int
    train: bool = False
    mc_samples: int | None = None
    quick: bool = False
    pythonpath: str | None = None


# ---------------------------------------------------------------------------- models
def causal_lm_loss(logits, labels):
    """Hugging Face's causal-LM loss: shift, flatten, ``ignore_index=-100``."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def gpt2(V: int, T: int, N: int, d: int = 64):
    """GPT-2 (2 layers, ``d``, 4 heads), tokens ``[N, T]`` and their labels."""
    import torch
    from zoo_imports import zoo

    _, transformers = zoo()
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=d, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (N, T), generator=gen)
    return model, causal_lm_loss, tokens, tokens.clone()


def zoo_model(name: str, N: int, quick: bool):
    """A model of the zoo table with its loss, inputs and targets."""
    import torch
    from zoo_imports import zoo

    timm, transformers = zoo()
    gen = torch.Generator().manual_seed(0)
    if name == "gpt2":
        return gpt2(1000 if not quick else 50, 32 if not quick else 8, N)
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256, max_position_embeddings=64,
            num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(cfg)
        tokens = torch.randint(0, 1000, (N, 32), generator=gen)
        y = torch.randint(0, 10, (N,), generator=gen)
        return model, torch.nn.CrossEntropyLoss(), tokens, y
    model = timm.create_model(name, num_classes=10)
    size = 32 if quick else 64
    X = torch.randn(N, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    return model, torch.nn.CrossEntropyLoss(), X, y


class LogitsOnly:
    """The previous release's view of GPT-2: ``[N, V, T − 1]`` shifted logits."""

    def __new__(cls, model):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, tokens):  # the shifted positions only
                return self.model(tokens).logits[:, :-1].transpose(1, 2)

        return Wrapped()


def build(case: Case):
    """``(model, loss, inputs, targets, options)`` of a case."""
    import torch

    torch.manual_seed(0)
    options: dict = {}
    if case.method == "generic":  # explicit Vᵀ from N·C full-batch VJPs
        options["engine"] = "generic"
    if case.mc_samples:
        options["mc_samples"] = case.mc_samples
        options["generator"] = torch.Generator().manual_seed(1)
    if case.part == "zoo":
        model, loss, X, y = zoo_model(case.model, case.N, case.quick)
    elif case.part == "resnet18":
        from harness.resnet import resnet18

        model = resnet18(num_classes=10)  # in-place ReLUs, as torchvision
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(case.N, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (case.N,), generator=gen)
        loss = torch.nn.CrossEntropyLoss()
    else:
        V, T = (1000, 32) if case.part == "gpt2" else (50257, 128)
        if case.quick:
            V, T = 50, 8
        model, loss, X, y = gpt2(V, T, case.N)
        if case.method == "previous":  # no output=, no flattening losses there
            model, loss, y = LogitsOnly(model), torch.nn.CrossEntropyLoss(), X[:, 1:]
    model.train(case.train)
    return model, loss, X, y, options


# ---------------------------------------------------------------------------- worker
def top_k(case: Case) -> int:
    return 5 if case.part == "resnet18" else 10


def run_method(case: Case) -> dict:
    """The case's call; its top eigenvalues and what the engine did."""
    model, loss, X, y, options = build(case)
    k = top_k(case)
    info: dict = {"D": sum(p.numel() for p in model.parameters())}
    if case.method == "curvlinops":
        info["top_eigenvalues"], extra = curvlinops_eigsh(model, loss, X, y, k)
        return {**info, **extra}
    import lowrank_ggn

    res = lowrank_ggn.ggn_spectrum(
        model, loss, X, y, top_k=k, eigenvectors=True, progress=False, **options
    )
    report = res.engine_report
    generic = [n for n, t in report.layers.items() if str(t) == "generic"]
    info.update(
        top_eigenvalues=[float(v) for v in res.eigenvalues[:k]],
        num_eigenvalues=res.eigenvalues.numel(),
        package=str(Path(lowrank_ggn.__file__).parent),
        path=res.path.name if hasattr(res.path, "name") else str(res.path),
        strategy=str(report.strategy),
        fallback=report.fallback,
        generic=generic,
        engine_report=plain_data(report),
    )
    return info


def worker(case: Case, threads: int) -> dict:
    if case.pythonpath:  # the previous release shadows the working tree
        sys.path.insert(0, case.pythonpath)
    import torch

    torch.set_num_threads(threads)
    if not case.quick:  # warm-up on a small batch
        run_method(dataclasses.replace(case, N=2))
    info, cost = measure(lambda: run_method(case))
    rec = {**dataclasses.asdict(case), "threads": threads}
    rec.pop("pythonpath")
    return {**rec, **cost, **info}


# ---------------------------------------------------------------------------- driver
def cases(part: str, args) -> list[Case]:
    q, prev = args.quick, args.previous_dir
    if part == "zoo":
        N = 2 if q else 8
        names = ZOO_MODELS[:1] + ZOO_MODELS[-2:] if q else ZOO_MODELS
        return [  # GPT-2's exact factors would be T·V = 32,000 columns per sample
            Case(part, "lowrank_ggn", name, N, train, 8 if name == "gpt2" else None, q)
            for name in names
            for train in (True, False)
        ]
    if part == "resnet18":
        N = 4 if q else 64
        return [
            Case(part, m, "resnet18", N, quick=q) for m in ("lowrank_ggn", "curvlinops")
        ]
    if part == "gpt2":
        N = 2 if q else 8
        return [  # 64 and 1,024 Gram columns
            Case(part, method, "gpt2", N, mc_samples=M, quick=q, pythonpath=path)
            for M in ((8,) if q else (8, 128))
            for method, path in (
                ("lowrank_ggn", None),
                ("generic", None),
                ("previous", prev),
            )
        ]
    N = 2 if q else 4
    return [
        Case(part, "lowrank_ggn", "gpt2-50k", N, mc_samples=m, quick=q) for m in (1, 3)
    ]


def run_case(case: Case, args) -> dict:
    """One case in a fresh subprocess; failures become rows, never raise."""
    fields = {"part": case.part, "method": case.method, "model": case.model}
    fields.update(N=case.N, train=case.train, mc_samples=case.mc_samples)
    announce(f"{case.part:9s} {case.model:22s} {case.method:12s}")
    if not available(case.method):
        return outcome({**fields, "skipped": "not installed"})
    cmd = [sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(case))]
    rec = run_worker(cmd + ["--threads", str(args.threads)], args.timeout)
    return outcome(rec if "error" not in rec else {**fields, **rec})


def ratios(records: list[dict]) -> list[dict]:
    """``t(peer) / t(lowrank_ggn)`` and top-k agreement, per part, peer and ``M``."""
    done = [r for r in records if "time_s" in r]
    pairs = (("resnet18", "curvlinops"), ("gpt2", "previous"), ("gpt2", "generic"))
    out = []
    for part, peer in pairs:
        for mine in (
            r for r in done if r["part"] == part and r["method"] == "lowrank_ggn"
        ):
            other = next(
                (
                    r
                    for r in done
                    if r["part"] == part
                    and r["method"] == peer
                    and r.get("mc_samples") == mine.get("mc_samples")
                ),
                None,
            )
            if other is None:
                continue
            dev = rel_dev(other["top_eigenvalues"], mine["top_eigenvalues"])
            out.append(
                {
                    "part": part,
                    "peer": peer,
                    "mc_samples": mine.get("mc_samples"),
                    "speedup": other["time_s"] / mine["time_s"],
                    "top_k_rel_dev": dev,
                }
            )
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Model zoo benchmark",
        "",
        f"Machine: {machine_words(m)}; {result['threads']} threads; {result['date']}.",
        "",
        "| part | model | mode | N | method | M | time (s) | peak RSS (GiB) | strategy | generic | eigenvalues |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        if "time_s" not in r:
            lines.append(f"| {r['part']} | {r['model']} | | {r['N']} | {r['method']} | | "
                         f"{r.get('error') or r.get('skipped')} | | | | |")  # fmt: skip
            continue
        mode = "train" if r["train"] else "eval"
        lines.append(
            f"| {r['part']} | {r['model']} | {mode} | {r['N']} | {r['method']} | "
            f"{r.get('mc_samples') or ''} | {r['time_s']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r.get('strategy', '')} | "
            f"{len(r.get('generic', []))} | {r.get('num_eigenvalues', len(r['top_eigenvalues']))} |"
        )
    lines += [
        "",
        "| part | peer | M | t(peer) / t(lowrank_ggn) | top-k deviation / λ_max |",
        "|---|---|---|---|---|",
    ]
    for c in result["ratios"]:
        lines.append(
            f"| {c['part']} | {c['peer']} | {c.get('mc_samples') or ''} | "
            f"{c['speedup']:.2f} | {c['top_k_rel_dev']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=PARTS)
    add_run_options(ap, quick="tiny sizes (smoke test)", out=RESULTS, threads=2)
    ap.add_argument("--previous", default=PREVIOUS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(Case(**json.loads(args.worker)), args.threads)))
        return
    with previous_release(args.previous) as args.previous_dir:
        parts = args.only or PARTS
        records = [run_case(c, args) for part in parts for c in cases(part, args)]
    result = {
        "machine": machine(args.device),
        "threads": args.threads,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "records": records,
        "ratios": ratios(records),
    }
    tag = "zoo_quick" if args.quick else f"zoo_{args.device}"
    write_results(args.out, tag, result, markdown(result))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
