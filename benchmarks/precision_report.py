r"""The markdown of ``bench_precision.py``: time and memory of the three variants,
eigenvalues per decade of ``λ/λ_max``, the trained digits zoo."""

from __future__ import annotations

from harness.machine import machine_words

RATIO_TARGET = 1.3  # t(float64 accumulation) / t(native) at N = 128
DECADES = 13  # decades of λ/λ_max counted


def markdown(result: dict) -> str:
    """Both parts' tables (a part not in ``result`` is left out)."""
    title = "# Float32 spectra: native vs float64 accumulation vs the float64 model"
    where = f"Machine: {machine_words(result['machine'])}, {result['threads']} threads."
    lines = [title, "", where + " Produced by `benchmarks/bench_precision.py`.", ""]
    part = result["parts"].get("3c3d")
    if part:
        lines += [
            "## 3c3d (random weights, CIFAR-10 shapes, C = 10): time and memory",
            "",
            "| model | N | variant | strategy | time [s] | peak RSS [GiB] | resolved | "
            "unresolved |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in part["records"]:
            if "error" in r:
                lines.append(
                    f"| {r['model']} | {r['N']} | {r['variant']} | error: "
                    f"{r['error']} | | | | |"
                )
                continue
            lines.append(
                f"| {r['model']} | {r['N']} | {r['variant']} | {r['strategy']} | "
                f"{r['time_s']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                f"{r['num_resolved']} | {r['num_unresolved']} |"
            )
        lines += [
            "",
            "| model | N | t(float64 acc.)/t(native) | t(float64 model)/t(native) "
            f"| target ≤ {RATIO_TARGET} | max rel. error native / float64 acc. | "
            "max error/bound | ReLU/max-pool sign flips f32 vs f64 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in part["summary"]:
            met = "met" if s["ratio_float64_to_native"] <= RATIO_TARGET else "missed"
            lines.append(
                f"| {s['model']} | {s['N']} | {s['ratio_float64_to_native']:.2f} | "
                f"{s['ratio_model64_to_native']:.2f} | {met} | "
                f"{s['max_rel_error_native']:.1e} / {s['max_rel_error_float64']:.1e} | "
                f"{max(s['max_error_over_bound_native'], s['max_error_over_bound_float64']):.2f} | "
                f"{s.get('kink_flips', '')} |"
            )
        lines += [
            "",
            "Times are the fastest of `--repeat` calls (see `times_s` in the JSON). A "
            "nonzero sign-flip count means float32 and float64 evaluate the net on "
            "different sides of a ReLU/max-pool kink: their GGNs are those of two "
            "different linearisations, which no round-off bound covers (max error/bound "
            "above 1 occurs exactly in those rows).",
        ]
        lines += [
            "",
            "Eigenvalues returned per decade of λ/λ_max "
            "(native / float64 accumulation / float64 model):",
            "",
            "| model | N | " + " | ".join(f"1e-{j + 1}" for j in range(DECADES)) + " |",
            "|---|---|" + "---|" * DECADES,
        ]
        for s in part["summary"]:
            d = s["decades"]
            cells = [
                f"{a}/{b}/{c}"
                for a, b, c in zip(d["native"], d["float64"], d["model64"])
            ]
            lines.append(f"| {s['model']} | {s['N']} | " + " | ".join(cells) + " |")
        lines.append("")
    part = result["parts"].get("digits")
    if part:
        lines += ["## Trained digits zoo (float32 training, N = 128, C = 10)", ""]
        for e in part["models"]:
            lines += [
                f"### {e['model']} ({e['train_steps']} SGD steps); max error/bound: "
                f"native {e['float32_native_max_error_over_bound']:.2f}, "
                f"float64 acc. {e['float32_float64_max_error_over_bound']:.2f}",
                "",
                "| decade of λ/λ_max | float64 (all / resolved) | float32 native | "
                "max rel. err. | float32 float64-acc. | max rel. err. |",
                "|---|---|---|---|---|---|",
            ]
            for j in range(DECADES):
                if not e["float64_all"][j]:
                    continue
                lines.append(
                    f"| (1e-{j + 1}, 1e-{j}] | {e['float64_all'][j]} / "
                    f"{e['float64_resolved'][j]} | {e['float32_native'][j]} | "
                    f"{e['float32_native_max_rel_error'][j]:.1e} | "
                    f"{e['float32_float64'][j]} | "
                    f"{e['float32_float64_max_rel_error'][j]:.1e} |"
                )
            lines.append("")
    return "\n".join(lines)
