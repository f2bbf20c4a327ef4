r"""The report of ``bench_batchnorm.py``: derived numbers, targets and the markdown.

Everything here reads records only (never runs anything): :func:`analyse` derives a
part's ratios and agreement, :func:`targets` checks each target against them, and
:func:`markdown` writes one table per part, the machine and the targets.
"""

from __future__ import annotations

from harness.machine import machine_line
from harness.models import BN_MODELS
from harness.results import failure, find, fmt, gib, ok, ratio, rel_dev, targets_table

AGREEMENT_RTOL = 1e-4  # top-k against dense, relative to λ_max (float32)
RSS_TARGET_BYTES = 5.5e9  # "5.5 GB", decimal
LANCZOS_RATIO_TARGET = 0.67  # t(lanczos) / t(curvlinops)
BN_RATIO_TARGET = 15.0  # t(3c3d-BN) / t(3c3d) at N = 128


def analyse(part: str, records: list[dict]) -> dict:
    """Derived numbers of one part (ratios, agreement), from its records only."""
    out: dict = {"records": records}
    if part == "bn_vs_plain":
        rows = []
        for N in sorted({r["N"] for r in records}):
            mine = [r for r in records if r["N"] == N and r["method"] == "lowrank_ggn"]
            plain = next((r for r in mine if r["model"] not in BN_MODELS), None)
            bn = next((r for r in mine if r["model"] in BN_MODELS), None)
            cols = find(records, N=N, method="lowrank_ggn[columns]")
            prev = find(records, N=N, method="previous")
            same = ok(cols) and ok(bn)
            rows.append(
                {
                    "N": N,
                    "bn_over_plain_time": ratio(bn, plain),
                    "columns_over_bn_time": ratio(cols, bn),
                    "previous_over_bn_time": ratio(prev, bn),
                    "same_nonzero_count_columns": (
                        cols["num_nonzero"] == bn["num_nonzero"] if same else None
                    ),
                }
            )
        out["ratios"] = rows
    elif part == "lanczos":
        dense = find(records, method="dense")
        rows = []
        for name in ("lanczos", "curvlinops"):
            r = find(records, method=name)
            dev = (
                rel_dev(r["top_eigenvalues"], dense["top_eigenvalues"])
                if ok(r) and ok(dense)
                else None
            )
            rows.append({"method": name, "max_rel_dev_from_dense": dev})
        lz, cv = find(records, method="lanczos"), find(records, method="curvlinops")
        out["agreement"] = rows
        out["lanczos_over_curvlinops_time"] = ratio(lz, cv)
    return out


def target(part: str, text: str, value, bar, spec: str) -> dict:
    """A target ``value ≤ bar`` (``value`` shown as ``spec``); ``met=None`` when
    either was not measured."""
    return {
        "part": part,
        "target": text,
        "value": None if value is None else format(value, spec),
        "met": None if value is None or bar is None else value <= bar,
    }


def targets(parts: dict) -> list[dict]:
    """Each target with its measured value and whether it is met (``None``: not measured)."""
    out = []
    if "bn_vs_plain" in parts:
        ratios = {
            r["N"]: r["bn_over_plain_time"] for r in parts["bn_vs_plain"]["ratios"]
        }
        at128, at256 = ratios.get(128), ratios.get(256)
        text = f"t(3c3d-BN) / t(3c3d) ≤ {BN_RATIO_TARGET:g} at N=128"
        out.append(target("bn_vs_plain", text, at128, BN_RATIO_TARGET, ".1f"))
        text = "the ratio at N=256 no larger than at N=128"
        out.append(target("bn_vs_plain", text, at256, at128, ".1f"))
    for r in parts.get("resnet18", {}).get("records", []):
        if r["model"] != "resnet18":
            continue
        value = r.get("peak_rss_bytes")
        out.append(
            {
                "part": "resnet18",
                "target": f"ResNet-18 train mode, N={r['N']}: peak RSS ≤ 5.5 GB",
                "value": f"{value / 1e9:.2f} GB"
                if value
                else r.get("error", r.get("skipped")),
                "met": None
                if "skipped" in r
                else (ok(r) and value <= RSS_TARGET_BYTES),
            }
        )
    if "lanczos" in parts:
        lz = parts["lanczos"]
        for row in lz["agreement"]:
            text = f"{row['method']} top-k within {AGREEMENT_RTOL:g}·λ_max of dense"
            dev = row["max_rel_dev_from_dense"]
            out.append(target("lanczos", text, dev, AGREEMENT_RTOL, ".1e"))
        text = f"t(lanczos) / t(curvlinops) ≤ {LANCZOS_RATIO_TARGET}"
        q = lz["lanczos_over_curvlinops_time"]
        out.append(target("lanczos", text, q, LANCZOS_RATIO_TARGET, ".2f"))
    return out


def engine_cell(r: dict) -> str:
    """The engine report in a few words: strategy/solver, layer kinds, passes."""
    rep = r.get("engine_report")
    if not rep:
        return r.get("path") or ""
    words = "/".join(
        str(rep[k]) for k in ("strategy", "solver") if rep.get(k) is not None
    )
    layers = rep.get("layers") or {}
    if layers:
        counts: dict[str, int] = {}
        for kind in layers.values():
            counts[str(kind)] = counts.get(str(kind), 0) + 1
        words += "; " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    if rep.get("fallback"):
        words += f"; fallback: {rep['fallback']}"
    passes = rep.get("passes") or {}
    if passes:
        words += "; passes " + ", ".join(f"{k}={v}" for k, v in passes.items())
    return words


HEAD = (
    "| model | N | method | time [s] | peak RSS [GiB] | baseline RSS [GiB] "
    "| nonzero eigenvalues | time / floor |"
)


def record_row(r: dict, extra: str | None = None) -> str:
    """A record as a table row (``extra``: one more cell before the engine's)."""
    head = f"| {r['model']} | {r['N']} | {r['method']} |"
    if not ok(r):
        return head + f" {failure(r)} | | | | | |" + (" |" if extra is not None else "")
    cells = [
        f"{r['time_s']:.2f}",
        gib(r["peak_rss_bytes"]),
        gib(r["baseline_rss_bytes"]),
        str(r.get("num_nonzero", "")),
        fmt(r.get("time_over_floor")),
    ]
    if extra is not None:
        cells.append(extra)
    return head + " " + " | ".join(cells) + f" | {engine_cell(r)} |"


def section(title: str, part: dict, extra: dict | None = None) -> list[str]:
    """A part's heading and its records' table (``extra``: a column by method)."""
    cells = "" if extra is None else " rel. dev. from dense |"
    lines = ["", f"## {title}{when(part)}", "", HEAD + cells + " engine |"]
    lines.append("|---" * (9 + (extra is not None)) + "|")
    for r in part["records"]:
        more = None if extra is None else (extra.get(r["method"]) or "–")
        lines.append(record_row(r, more))
    return lines


def markdown(result: dict, tag: str) -> str:
    """The report: machine, how peaks are measured, one section per part, targets."""
    parts = result["parts"]
    measured = [r for p in parts.values() for r in p["records"] if ok(r)]
    lines = [
        f"# Train-mode BatchNorm: cost and scale, float32 ({tag})",
        "",
        machine_line(result),
        "",
        "Peak RSS is each worker's `VmHWM` over the timed call, its peak mark reset "
        "after the warm-up "
        + (
            "(every measured row)"
            if all(r.get("peak_rss_reset") for r in measured)
            else "(**not** for every row: those peaks include the warm-up's)"
        )
        + "; it includes the baseline resident at the call's start (Python, torch, "
        "model, data). 1 GiB = 2³⁰ bytes; the RSS target is in GB (10⁹ bytes). "
        "time / floor: the call's time over the floor of its work measured in the same "
        "worker (`harness.floor`: one forward pass, C backward passes, the Gram's "
        "`syrk` over the explicitly formed rows, `eigh` of the Gram; rows that ran "
        "without it are blank).",
    ]
    if "bn_vs_plain" in parts:
        p = parts["bn_vs_plain"]
        lines += section("3c3d with and without BatchNorm (train mode)", p)
        lines += [
            "",
            "| N | t(BN) / t(plain) | t(columns) / t(BN) | t(previous) / t(BN) "
            "| columns and BN: same rank |",
            "|---|---|---|---|---|",
        ]
        for q in p["ratios"]:
            cells = [
                q["bn_over_plain_time"],
                q["columns_over_bn_time"],
                q.get("previous_over_bn_time"),
                q["same_nonzero_count_columns"],
            ]
            lines.append(f"| {q['N']} | " + " | ".join(map(fmt, cells)) + " |")
    if "resnet18" in parts:
        title = "ResNet-18 (train-mode BN; eval mode for reference)"
        lines += section(title, parts["resnet18"])
    if "lanczos" in parts:
        p = parts["lanczos"]
        devs = {
            row["method"]: fmt(row["max_rel_dev_from_dense"], ".1e")
            for row in p["agreement"]
        }
        lines += section("Top-k: Lanczos vs dense vs curvlinops + eigsh", p, devs)
        ratio_line = fmt(p["lanczos_over_curvlinops_time"])
        lines += ["", f"t(lanczos) / t(curvlinops) = {ratio_line}"]
    lines += ["", "## Targets", ""]
    if not result["targets"]:
        lines.append("None in the parts run (part bn_vs_plain has no target).")
    else:
        lines += targets_table(result["targets"], part=True)
    return "\n".join(lines) + "\n"


def when(part: dict) -> str:
    """`` (date, T threads)`` of one part's run, for its heading."""
    if "measured" not in part:
        return ""
    return f" ({part['measured']}, torch threads={part['threads']})"
