"""The README's damped-Newton sentences against the optimiser experiments' JSON.

Every number and comparison the README states about ``experiments/optimizers``
(the defaults study, ``defaults.json``, and the experiment, ``results.json``) is
recomputed here, so that a stale sentence fails CI (helpers: ``test_readme_claims``).
"""

from __future__ import annotations

import numpy as np
from test_readme_claims import results, said, span


# -------------------------------------------------------- damped Newton: the defaults
def test_damped_newton_defaults_study():
    from lowrank_ggn.optim.damped_newton import (
        DEFAULT_COMPLEMENT_LR,
        DEFAULT_DAMPING,
        DEFAULT_MOMENTUM,
        DEFAULT_TOP_K,
    )

    res = results("optimizers", "defaults.json")
    s = res["settings"]
    assert res["defaults"] == {
        "top_k": DEFAULT_TOP_K,
        "lr": 1.0,
        "complement_lr": DEFAULT_COMPLEMENT_LR,
        "momentum": DEFAULT_MOMENTUM,
        "damping": DEFAULT_DAMPING,
    }
    said(
        f"`top_k={DEFAULT_TOP_K}`, `damping={DEFAULT_DAMPING:g}`, `lr=1`, "
        f"`complement_lr={DEFAULT_COMPLEMENT_LR:g}`, `momentum={DEFAULT_MOMENTUM:g}`"
    )
    said(
        f"{s['steps']} steps of batches of {s['batch_size']}, mean final training "
        f"loss over {s['seeds']} seeds ({s['seeds_digits']} on the digits)"
    )

    def row(prob, settings):
        return next(
            r["mean_train_loss"]
            for r in prob["rows"]
            if r["optimizer"] == "DampedNewton" and r["settings"] == settings
        )

    for prob in res["problems"]:
        zero = row(prob, {"complement_lr": 0.0, "momentum": 0.0, "damping": 1.0})
        said(
            f"| {prob['label']}, D = {prob['num_params']:,} | {prob['seeds']} | "
            f"{prob['tuned_sgd_loss']:.3f} ({prob['tuned_sgd_lr']:g}) | "
            f"{prob['default_loss']:.3f} | {prob['default_over_tuned_sgd']:.2f} | "
            f"{zero:.3f} |"
        )
        assert zero > prob["default_loss"]  # complement_lr = 0 trains less
    bar = [p for p in res["problems"] if p["problem"] != "digits-cnn-bn"]
    assert all(p["within_bar"] for p in bar)
    said(
        "within 10 % of tuned SGD's or below it on both problems new to the "
        "experiments, the teacher-student MLP and the synthetic BN CNN (ratios "
        f"{span([p['default_over_tuned_sgd'] for p in bar])})"
    )
    for p in bar:  # "its momentum helps on both problems"
        plain = row(p, {"complement_lr": 0.1, "momentum": 0.0, "damping": 1.0})
        assert plain > p["default_loss"]
    said("its momentum helps on both problems")
    bn = next(p for p in res["problems"] if p["problem"] == "synthetic-bn-cnn")
    low = row(bn, {"complement_lr": 1.0, "momentum": 0.0, "damping": 0.1})
    one = row(bn, {"complement_lr": 1.0, "momentum": 0.0, "damping": 1.0})
    assert low > 2 * one
    said(f"δ = 0.1 ends at {low:.2f} against {one:.2f} for δ = 1")


# ------------------------------------------------------ damped Newton: the experiment
def _final(run: dict, key: str) -> float:
    return run["evals"][-1][key]


def test_optimizers_experiment():
    res = results("optimizers")
    s = res["settings"]
    said(
        f"{s['seeds']} seeds, {s['steps']} steps of batches of {s['batch_size']}; "
        f"each optimiser's learning rate (damped Newton: `complement_lr`) chosen "
        f"from {len(s['grids']['SGD'])} values by the training loss after "
        f"{s['pilot_steps']} steps of seed 0"
    )
    for prob in res["problems"]:
        metric = "test_error" if prob["classification"] else "test_loss"
        for opt in prob["optimizers"]:
            runs = opt["runs"]
            loss = [_final(r, "train_loss") for r in runs]
            test = [_final(r, metric) for r in runs]
            secs = [r["steps"][-1]["seconds"] for r in runs]
            dirs = (
                f"{np.mean([p['num_directions'] for r in runs for p in r['steps']]):.1f}"
                if opt["optimizer"].startswith("DampedNewton")
                else ""
            )
            said(
                f"| {prob['problem']} | {opt['optimizer']} | {opt['lr']:g} | "
                f"{np.median(loss):.4f} ({span(loss, '.4f')}) | "
                f"{np.median(test):.3f} | {np.median(secs):.1f} s | {dirs} |"
            )


def test_optimizers_experiment_prose():
    res = results("optimizers")
    probs = {p["problem"]: p for p in res["problems"]}

    def med(prob: str, opt: str, what: str) -> float:
        o = next(o for o in probs[prob]["optimizers"] if o["optimizer"] == opt)
        if what == "seconds":
            return float(np.median([r["steps"][-1]["seconds"] for r in o["runs"]]))
        return float(np.median([_final(r, what) for r in o["runs"]]))

    dn, boot = "DampedNewton, constant", "DampedNewton, bootstrap"
    digits = {o: med("digits-cnn-bn", o, "train_loss") for o in ("SGD", "Adam", dn)}
    assert digits[dn] < digits["Adam"] < digits["SGD"]
    assert digits[dn] < med("digits-cnn-bn", boot, "train_loss")  # lowest of all
    err = {o: med("digits-cnn-bn", o, "test_error") for o in ("Adam", dn)}
    assert f"{err[dn]:.3f}" == f"{err['Adam']:.3f}"
    said(
        f"ends lowest on the digits ({digits[dn]:.4f} against {digits['Adam']:.4f} "
        f"for Adam and {digits['SGD']:.4f} for SGD; test error {err[dn]:.3f}, like "
        "Adam's)"
    )
    ts = [
        med("teacher-student", o["optimizer"], "train_loss")
        for o in probs["teacher-student"]["optimizers"]
    ]
    said(f"where all four end within {span(ts, '.4f')}")
    ratios = {
        p: [med(p, dn, "seconds") / med(p, o, "seconds") for o in ("SGD", "Adam")]
        for p in probs
    }
    said(
        f"per second it is {span(ratios['digits-cnn-bn'], '.0f')}× slower than SGD "
        f"and Adam on the digits and {span(ratios['teacher-student'], '.0f')}× on the "
        "teacher-student problem"
    )
    stats = []
    for p in ("digits-cnn-bn", "teacher-student"):
        o = next(o for o in probs[p]["optimizers"] if o["optimizer"] == boot)
        steps = [s for r in o["runs"] for s in r["steps"]]
        finite = [d for s in steps for d in s["damping"] if d is not None]
        total = sum(len(s["damping"]) for s in steps)
        stats.append(
            {
                "dirs": np.mean([s["num_directions"] for s in steps]),
                "none": 100 * (1 - len(finite) / total),
                "empty": sum(s["num_directions"] == 0 for s in steps),
                "steps": len(steps),
                "median": float(np.median(finite)),
            }
        )
    a, b = stats
    assert a["steps"] == b["steps"] and min(a["median"], b["median"]) > 1.0
    said(
        f"Bootstrap damping steps along {a['dirs']:.1f} (digits) and {b['dirs']:.1f} "
        "(teacher-student) of the 10 directions on average: for "
        f"{a['none']:.0f} % and {b['none']:.0f} % of the directions the 5 % quantile "
        f"of the resampled gain is negative at every damping (no direction at all in "
        f"{a['empty']} and {b['empty']} of {a['steps']} steps), and its finite "
        f"dampings (medians {a['median']:.1f} and {b['median']:.1f}) lie above the "
        "constant δ = 1"
    )
    said(f"The full run took {res['seconds_total']:.0f} s on 2 cores")
