r"""The report of ``bench_models.py``: comparisons, targets and the markdown.

Reads records only: :func:`analyse` compares every method's time and top-10 with
lowrank_ggn's per (model, N), :func:`targets` checks the transformer's speed-ups at
N = 128, :func:`markdown` writes the tables and the cost model in words.
"""

from __future__ import annotations

from harness.results import failure, find, fmt, ok, rel_dev, targets_table

AGREEMENT_RTOL = 1e-4  # top-10 against the reference, relative to λ_max (float32)
METHODS = ("lowrank_ggn", "lowrank_ggn_f64", "previous", "curvlinops")
TARGET_N = 128
# t(method) / t(lowrank_ggn) on the transformer at N = 128, at least
SPEEDUP_TARGETS = {"previous": 5.0, "curvlinops": 3.0}


def analyse(records: list[dict]) -> list[dict]:
    """Per (model, N): speed-ups over lowrank_ggn and top-10 agreement with it.

    The reference for agreement is lowrank_ggn, or the first other method measured
    when it failed (named in ``reference``).
    """
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        for N in sorted({r["N"] for r in records if r["model"] == model}):
            at = {m: find(records, model=model, N=N, method=m) for m in METHODS}
            ref = next((m for m in METHODS if ok(at[m])), None)
            row: dict = {"model": model, "N": N, "reference": ref}
            row["D"] = at[ref]["D"] if ref else None
            base = at["lowrank_ggn"]
            for m in ("previous", "curvlinops"):
                r = at[m]
                row[f"speedup_vs_{m}"] = (
                    r["time_s"] / base["time_s"] if ok(r) and ok(base) else None
                )
            f64, r = at["lowrank_ggn_f64"], at["curvlinops"]
            row["f64_speedup_vs_curvlinops"] = (
                r["time_s"] / f64["time_s"] if ok(r) and ok(f64) else None
            )
            row["agreement"] = {
                m: rel_dev(at[m]["top_eigenvalues"], at[ref]["top_eigenvalues"])
                for m in METHODS
                if m != ref and ok(at[m])
            }
            rows.append(row)
    return rows


def targets(comparisons: list[dict], quick: bool) -> list[dict]:
    """The issue's two targets on the transformer at N = 128 (``met=None``: not measured)."""
    row = next(
        (c for c in comparisons if c["model"] == "transformer" and c["N"] == TARGET_N),
        None,
    )
    out = []
    for m, bar in SPEEDUP_TARGETS.items():
        value = None if row is None or quick else row[f"speedup_vs_{m}"]
        out.append(
            {
                "target": f"transformer, N={TARGET_N}: t({m}) / t(lowrank_ggn) ≥ {bar:g}",
                "value": None if value is None else round(value, 2),
                "met": None if value is None else value >= bar,
            }
        )
    return out


def engine_cell(r: dict) -> str:
    """Path, strategy, pass counts and layer treatments in a few words."""
    if "products" in r:
        return f"eigsh, {r['products']} GGN-vector products (SDPA {r['sdpa_backend']})"
    rep = r.get("engine_report") or {}
    words = [r.get("path") or "?"]
    if rep.get("strategy"):
        words[0] += f" / {rep['strategy']}"
    passes = rep.get("passes") or {}
    if passes:
        words.append("passes " + ", ".join(f"{k}={v}" for k, v in passes.items()))
    counts: dict[str, int] = {}
    for kind in (rep.get("layers") or {}).values():
        counts[kind] = counts.get(kind, 0) + 1
    if counts:
        words.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if rep.get("fallback"):
        words.append(f"fallback: {rep['fallback']}")
    if r.get("accumulate"):
        words.append(f"{r['accumulate']} sums")
    return "; ".join(words)


COST_MODEL = (
    "**Cost model.** The per-sample path (this release on both models) runs one "
    "forward pass and C backward passes of the whole batch (the cotangents "
    "`S[c]`, all samples at once), so its autodiff work grows linearly in N and in C "
    "and is independent of how many Gram columns there are; it then assembles the "
    "`NC × NC` Gram matrix layer by layer, from Kronecker factors (layer inputs and "
    "output gradients, per position for the transformer's linear maps) or from "
    "explicit per-sample rows `[NC, D_l]` in chunks, whichever is cheaper: "
    "`O((NC)²·min(D_l, T·(d_in + d_out)))` for a layer of `D_l` parameters applied at "
    "`T` positions, plus `O((NC)³)` for the eigendecomposition; memory is the Gram "
    "matrix `(NC)²` plus one layer's chunk of rows, never `NC × D`. The previous "
    "release's full-batch path (taken whenever its per-sample check fails, as on the "
    "transformer) runs one backward pass of the whole batch per Gram column: `N·C` "
    "passes, each `O(N)`, so `O(N²·C)` autodiff work, quadratic in N, and it holds "
    "explicit rows `[NC, D_l]` for layers whose gradients mix samples, up to "
    "`N·C·D` floats. curvlinops + eigsh costs one forward-mode and one reverse-mode "
    "pass of the whole batch (`O(N)`) per GGN-vector product and as many products "
    "as the Lanczos iteration needs for the top 10 (set by the spectral gaps, not "
    "by N or C; counted in the table), with memory `O(D·ncv)`."
)


def markdown(result: dict, tag: str) -> str:
    recs, comps = result["records"], result["comparisons"]
    measured = [r for r in recs if ok(r)]
    mach = result["machine"]
    lines = [
        f"# Transformer and MobileNet: top-10 GGN eigenpairs, float32 ({tag})",
        "",
        f"Machine: cpu={mach['cpu']}, cores={mach['cores']}, torch={mach['torch']}, "
        f"torch threads={result['threads']}; measured {result['measured']}"
        + (
            " (**quick run**: tiny models, no timing targets)"
            if result["quick"]
            else ""
        ),
        "",
        "Each (method, model, N) in a fresh process, warm-up on N = 4 (not in quick "
        "runs), one timed call. Peak RSS is `VmHWM` of the timed call, its mark "
        "reset after the warm-up "
        + (
            "(every measured row)"
            if all(r.get("peak_rss_reset") for r in measured)
            else "(**not** for every row: those include the warm-up's)"
        )
        + ", baseline (Python, torch, model, data) included; 1 GiB = 2³⁰ bytes. "
        f"`previous` is lowrank_ggn at `{result['previous']}`; it and curvlinops see "
        "the transformer behind `Packed` (one `[N, 64]` int64 tensor), this release "
        "the tuple `(tokens, mask)`. curvlinops runs the transformer under "
        "`sdpa_kernel(SDPBackend.MATH)`.",
        "",
        "| model | N | D | method | path / engine | time [s] | peak RSS [GiB] "
        "| baseline RSS [GiB] | top-10 rel. dev. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    devs = {(c["model"], c["N"]): c for c in comps}
    for r in recs:
        D = f"{r['D']:,}" if "D" in r else ""
        head = f"| {r['model']} | {r['N']} | {D} | {r['method']} |"
        if not ok(r):
            lines.append(head + f" {failure(r, 100)} | | | | |")
            continue
        c = devs[(r["model"], r["N"])]
        dev = (
            "reference"
            if c["reference"] == r["method"]
            else fmt(c["agreement"].get(r["method"]), ".1e")
        )
        lines.append(
            head + f" {engine_cell(r)} | {r['time_s']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['baseline_rss_bytes'] / 2**30:.2f} "
            f"| {dev} |"
        )
    lines += [
        "",
        "Top-10 rel. dev.: `max_i |λ_i − λ_i^ref| / λ_max^ref` against the reference "
        f"(lowrank_ggn unless it failed); bar {AGREEMENT_RTOL:g} in float32.",
        "",
        "| model | N | t(previous) / t(lowrank_ggn) | t(curvlinops) / t(lowrank_ggn) "
        "| t(curvlinops) / t(lowrank_ggn_f64) "
        f"| top-10 within {AGREEMENT_RTOL:g}·λ_max |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps:
        agree = c["agreement"]
        within = (
            ""
            if not agree
            else "yes"
            if all(v <= AGREEMENT_RTOL for v in agree.values())
            else "**no**"
        )
        lines.append(
            f"| {c['model']} | {c['N']} | {fmt(c['speedup_vs_previous'])} | "
            f"{fmt(c['speedup_vs_curvlinops'])} | "
            f"{fmt(c.get('f64_speedup_vs_curvlinops'))} | {within} |"
        )
    notes = sorted(
        {r["without_math_backend"] for r in recs if r.get("without_math_backend")}
    )
    if notes:
        lines += [
            "",
            "curvlinops on the transformer without the math attention backend "
            "(N = 2): " + "; ".join(notes) + ".",
        ]
    lines += ["", "## Targets", "", *targets_table(result["targets"]), "", COST_MODEL]
    return "\n".join(lines) + "\n"
