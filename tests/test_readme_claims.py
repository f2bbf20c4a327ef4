"""Every number and comparison the README states about an experiment, from its JSON.

Each test reads an experiment's committed ``results.json`` (never reruns it),
recomputes what the README says about it — values, ranges, ratios, crossovers,
orderings — writes the sentence fragment the README must contain with these values,
and checks that the README contains it (whitespace-normalised). A rerun that changes
a number, or a comparison that no longer holds, fails here until the sentence is
rewritten.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
MIB = 2**20


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text)


README = _normal((ROOT / "README.md").read_text())


def said(fragment: str) -> None:
    """The README states ``fragment`` (whitespace-normalised)."""
    fragment = _normal(fragment)
    assert fragment in README, f"README does not say (or no longer says): {fragment!r}"


def results(name: str, file: str = "results.json") -> dict:
    path = EXPERIMENTS / name / file
    if not path.exists():
        pytest.skip(f"{path} is not committed")
    return json.loads(path.read_text())


def span(values, fmt: str = ".2f", sep: str = "–") -> str:
    """``lo–hi`` of ``values`` formatted as the README writes ranges."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}{sep}{hi}"


# ----------------------------------------------------------- spectrum approximations
def test_spectrum_approximations():
    res = results("spectrum_approximations")
    s = res["settings"]
    err = {
        r["bn_mode"] != "none": {
            m: float(np.mean(v[:10])) for m, v in r["topk_rel_error"].items()
        }
        for r in res["runs"]
    }
    no_bn, bn = err[False], err[True]
    said(
        f"per-layer blocks {no_bn['block_diagonal']:.2f} without BN and "
        f"{bn['block_diagonal']:.2f} with BN, sub-sampling {no_bn['subsampled']:.2f} "
        f"and {bn['subsampled']:.2f}, MC with M = {s['mc_samples']} "
        f"{no_bn['mc']:.2f} and {bn['mc']:.2f} (it keeps only N = {s['batch_size']} "
        "columns)"
    )
    assert all(len(r["eigenvalues"]["mc"]) <= s["batch_size"] for r in res["runs"])
    # without BN the blocks and sub-sampling tie to two digits; with BN blocks win
    assert f"{no_bn['block_diagonal']:.2f}" == f"{no_bn['subsampled']:.2f}"
    assert no_bn["mc"] > no_bn["block_diagonal"]
    said("without BN the blocks and sub-sampling tie, with BN the blocks are best")
    assert bn["block_diagonal"] < min(bn["subsampled"], bn["mc"])


# --------------------------------------------------------------------- top-k runtime
def _times(records, model: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r["model"] == model and "seconds" in r:
            out.setdefault(r["method"], {})[r["k"]] = r["seconds"]
    return out


def test_topk_runtime_crossovers():
    res = results("topk_runtime")
    models = list(dict.fromkeys(r["model"] for r in res["records"]))
    plain, bn = (_times(res["records"], m) for m in models)

    # without BN: from which measured k every iterative method is slower than dense
    dense = plain["dense"][max(plain["dense"])]
    iterative = {m: t for m, t in plain.items() if m != "dense"}
    ks = sorted({k for t in iterative.values() for k in t})
    slower_from = next(
        k
        for k in ks
        if all(t[j] > dense for t in iterative.values() for j in t if j >= k)
    )
    before = max(k for k in ks if k < slower_from)
    fastest = min(
        (t[before], m) for m, t in iterative.items() if before in t
    )  # who still beats dense there
    assert fastest[0] < dense and fastest[1] == "curvlinops"
    said(
        f"Without BN the dense solver ({dense:.1f} s for every eigenvalue) is faster "
        f"than every iterative method from k = {slower_from} on (at k = {before} "
        f"curvlinops + `eigsh` still takes {fastest[0]:.1f} s)"
    )
    lz, cv = plain["lanczos"], plain["curvlinops"]
    said(
        f"Lanczos takes {lz[1]:.1f} s at k = 1 and {lz[20]:.1f} s at k = 20, against "
        f"{cv[1]:.1f} s and {cv[20]:.1f} s for curvlinops + `eigsh`"
    )

    # with BN: the last measured k where Lanczos beats dense, and the next one
    dense = bn["dense"][max(bn["dense"])]
    lz, cv = bn["lanczos"], bn["curvlinops"]
    cheaper = [k for k in sorted(lz) if lz[k] < dense]
    last = max(cheaper)
    after = min(k for k in lz if k > last)
    assert all(lz[k] > dense for k in lz if k > last)
    said(
        f"With train-mode BN the dense solver takes {dense:.1f} s and Lanczos is the "
        f"cheaper route up to k = {last} ({lz[1]:.1f} s at k = 1, {lz[last]:.1f} s at "
        f"k = {last}, {lz[after]:.1f} s at k = {after}: the crossover lies between "
        f"k = {last} and {after}; curvlinops {cv[1]:.1f} s at k = 1, "
        f"{cv[max(cv)]:.1f} s at k = {max(cv)})"
    )


# ----------------------------------------------------------------- batch-size limits
def test_batch_size_limits():
    res = results("batch_size_limits")
    limit = {
        (r["model"].split()[0], r["variant"], r["method"]): r["limit_N"]
        for r in res["rows"]
    }

    def pair(variant: str, a: str, b: str | None = None) -> str:
        return f"{limit['cnn', variant, a]}/{limit['cnn-bn', variant, b or a]}"

    said(
        f"Exact spectrum, cnn/cnn-bn: the cost model's choice (auto) N = "
        f"{pair('exact', 'auto')}, per-sample/bn-split "
        f"{pair('exact', 'per_sample', 'bn_split')}, columns "
        f"{pair('exact', 'columns')}, streamed {pair('exact', 'streamed')}, vivit "
        f"{pair('exact', 'vivit')}. Monte-Carlo (M = 1): auto {pair('mc', 'auto')}, "
        f"per-sample/bn-split {pair('mc', 'per_sample', 'bn_split')}, columns "
        f"{pair('mc', 'columns')}, streamed {pair('mc', 'streamed')}, vivit "
        f"{pair('mc', 'vivit')}."
    )
    ratios = [
        limit[m, v, "vivit"] / limit[m, v, "auto"]
        for m in ("cnn", "cnn-bn")
        for v in ("exact", "mc")
    ]
    said(f"vivit fits {span(ratios, '.1f')}× larger batches")
    pkg = {(r["model"].split()[0], r["variant"]): r for r in res["package_limits"]}
    said(
        f"The package's own limits (dashed: {pkg['cnn', 'exact']['package_largest_N']}"
        f"/{pkg['cnn', 'mc']['package_largest_N']} on cnn, "
        f"{pkg['cnn-bn', 'exact']['package_largest_N']}/"
        f"{pkg['cnn-bn', 'mc']['package_largest_N']} on cnn-bn, refused one sample "
        "above)"
    )
    for r in pkg.values():
        above = r["run_above_limit"]
        assert above["N"] == r["package_largest_N"] + 1
        assert above["outcome"] == "refused"
    budget = res["settings"]["budget_bytes"]
    within = [r for r in pkg.values() if r["run_at_limit"]["peak_bytes"] <= budget]
    over = [r for r in pkg.values() if r not in within]
    assert [(r["model"].split()[0], r["variant"]) for r in over] == [
        ("cnn-bn", "exact")
    ]
    peaks = [r["run_at_limit"]["peak_bytes"] / MIB for r in within]
    said(f"peak at {span(peaks, '.1f')} MiB, within the budget")
    (o,) = over
    said(
        f"except cnn-bn exact at N = {o['package_largest_N']} "
        f"(`{o['run_at_limit']['strategy_run']}`, "
        f"{o['run_at_limit']['peak_bytes'] / MIB:.1f} MiB"
    )
    assert o["run_at_limit"]["peak_bytes"] <= 1.1 * (budget + 64 * MIB)
    said(f"{res['seconds_total']:.0f} s on 2 shared cores")


# --------------------------------------------------------------- training monitoring
def test_training_monitoring():
    res = results("training_monitoring")
    cnn, bn = res["runs"]
    first, last = cnn["points"][0], cnn["points"][-1]
    b_first, b_last = bn["points"][0], bn["points"][-1]
    said(
        f"(cnn {first['overlap_mini_full']:.2f} → {last['overlap_mini_full']:.2f}, "
        f"cnn-bn {b_first['overlap_mini_full']:.2f} → {b_last['overlap_mini_full']:.2f}"
        f" from step {first['step']} to {last['step']})"
    )
    said(
        f"{first['overlap_ggn_hessian']:.2f} → {last['overlap_ggn_hessian']:.2f} and "
        f"{b_first['overlap_ggn_hessian']:.2f} → {b_last['overlap_ggn_hessian']:.2f}: "
        "the GGN's top space becomes the Hessian's as the loss falls)"
    )
    for run in (cnn, bn):  # "becomes": it rises at every checkpoint
        values = [p["overlap_ggn_hessian"] for p in run["points"]]
        assert values == sorted(values)


# --------------------------------------------------------------- BatchNorm structure
def test_batchnorm_structure():
    res = results("batchnorm_structure")
    rows = res["shortcut"]["rows"]
    lam = {r["N"]: r["topk_rel_error"][0] for r in rows}
    trace = [r["trace_rel_error"] for r in rows]
    N_min = min(lam, key=lam.get)
    growing = [lam[N] for N in sorted(lam) if N >= N_min]
    assert growing == sorted(growing)  # from its minimum on, λ₁'s error grows with N
    said(
        f"gets λ₁ wrong by {100 * lam[min(lam)]:.0f} % at N = {min(lam)} and "
        f"{100 * lam[max(lam)]:.0f} % at N = {max(lam)}, the trace by "
        f"{span([100 * t for t in trace], '.0f')} %; from N = {N_min} on, λ₁'s error "
        "grows with N"
    )
    viv = [r for r in rows if "vivit_topk_rel_error" in r]
    assert viv and all(min(r["vivit_topk_rel_error"]) > 1e-3 for r in viv)
    assert res["shortcut"]["vivit"]["max_rel_dev_vivit_vs_shortcut"] > 1e-3
    said("vivit's spectrum is neither exact nor this shortcut")

    m = res["moments"]
    said(
        f"different means (cosine {m['gradient_cosine']:.2f}) and SNRs "
        f"({m['per_component']['total_snr']:.3f} vs "
        f"{m['per_sample_frozen']['total_snr']:.3f})"
    )

    steps = max(r["train_steps"] for r in res["outliers"])
    trained = [r for r in res["outliers"] if r["train_steps"] == steps]
    by = {
        name: [r for r in trained if r["model"] == name] for name in ("cnn", "cnn-bn")
    }
    share = {k: [r["topC_trace_share"] for r in v] for k, v in by.items()}
    assert max(share["cnn-bn"]) < min(share["cnn"])  # "falls"
    geo = {
        k: math.exp(np.mean([math.log(r["top1_over_median"]) for r in v]))
        for k, v in by.items()
    }
    assert round(geo["cnn"] / geo["cnn-bn"]) == 10
    gaps = [r["gap_C_over_C1"] for r in trained]
    said(
        f"over {len(by['cnn'])} seeds the top-10 share of the trace falls from "
        f"{span(share['cnn'])} to {span(share['cnn-bn'])} and λ₁/median by about 10×; "
        f"neither model has a gap after the 10th eigenvalue (λ₁₀/λ₁₁ = {span(gaps)})"
    )
    cls = {r["model"]: r for r in res["class_structure"]}
    said(
        f"overlaps the span of the 10 class-mean gradients by "
        f"{cls['cnn']['overlap_topC_classmeans']:.2f} (no BN) and "
        f"{cls['cnn-bn']['overlap_topC_classmeans']:.2f} (BN), against "
        f"{cls['cnn']['random_baseline']:.3f} for a random subspace"
    )


def test_make_figures_time():
    makefile = (ROOT / "Makefile").read_text()
    names = re.search(r"FIGURES = (.*?)\n\n", makefile, re.S).group(1).split()
    names = [n for n in names if n != "\\"]
    minutes = {n: results(n)["seconds_total"] / 60 for n in names}
    first_six = names[:6]
    said(
        f"the committed runs took {sum(minutes.values()):.1f} min together (the sum of "
        f"their `seconds_total`: {sum(minutes[n] for n in first_six):.1f} min for the "
        f"first six, {minutes['optimizers']:.1f} min for `optimizers` and "
        f"{minutes['ggn_diagonal']:.1f} min for `ggn_diagonal`"
    )


# ---------------------------------------------------------------------- ggn diagonal
def test_ggn_diagonal():
    res = results("ggn_diagonal")
    plain, bn = res["runs"]
    assert plain["model"] == "cnn" and bn["model"] == "cnn-bn"

    def means(run, j):
        return [p["layers"][j]["mean_diag"] for p in run["points"]]

    def layers(run):
        return range(len(run["points"][0]["layers"]))

    steps = [p["step"] for p in plain["points"]]
    rise = [max(means(plain, j)) / means(plain, j)[0] for j in layers(plain)]
    fall = [max(means(plain, j)) / means(plain, j)[-1] for j in layers(plain)]
    peak_at = {
        steps[means(plain, j).index(max(means(plain, j)))] for j in layers(plain)
    }
    trace = [p["trace"] for p in plain["points"]]
    assert peak_at == {30} and trace.index(max(trace)) == steps.index(30)
    said(
        f"Without BN every layer's mean rises {span(rise, '.0f')}× while the loss falls "
        f"fastest (`tr G` {trace[0]:.1f} → {max(trace):.0f} at step 30), then falls "
        f"{span(fall, '.0f')}× by step {steps[-1]:,}."
    )
    kinds = {la["kind"]: j for j, la in enumerate(bn["points"][0]["layers"])}
    shared = [la["kind"] for la in plain["points"][0]["layers"]]
    start = [means(bn, kinds[k])[0] / means(plain, j)[0] for j, k in enumerate(shared)]
    bn_fall = [max(means(bn, j)) / means(bn, j)[-1] for j in layers(bn)]
    bn_peak = [steps[means(bn, j).index(max(means(bn, j)))] for j in layers(bn)]
    last = [means(bn, j)[-1] for j in layers(bn)]
    assert max(bn_peak) == 30 and last.index(max(last)) == kinds["Conv2d 1"]
    said(
        f"With BN the convolutions and the linear layer start {span(start, '.0f')}× more "
        "curved, peak by step 30 at the latest, and fall "
        f"{span(bn_fall, '.0f')}× from their peaks; the first convolution ends the most "
        "curved."
    )
    share = {r["model"]: r["points"][-1]["layers"] for r in res["runs"]}
    bn_share = sum(
        la["trace_share"] for la in share["cnn-bn"] if "BatchNorm" in la["kind"]
    )
    said(
        f"the BN model puts {100 * share['cnn-bn'][0]['trace_share']:.0f} % of `tr G` "
        f"into its first convolution ({100 * share['cnn'][0]['trace_share']:.0f} % "
        f"without BN), and the BN parameters hold {100 * bn_share:.1f} %."
    )
    early = [
        la["mc_rel_error"]
        for r in res["runs"]
        for p in r["points"]
        if p["step"] <= 10
        for la in p["layers"]
    ]
    late = [
        la["mc_rel_error"]
        for r in res["runs"]
        for p in r["points"]
        if p["step"] >= 300
        for la in p["layers"]
    ]
    said(
        f"is within {math.ceil(100 * max(early)):.0f} % of the exact one in the first "
        f"10 steps and misses {span([100 * v for v in late], '.0f')} % of it once the "
        "net is confident (step ≥ 300)"
    )
    worst = max(p["trace_vs_eigenvalues"] for r in res["runs"] for p in r["points"])
    said(f"eigenvalues to {worst:.1e} relative at every checkpoint")
