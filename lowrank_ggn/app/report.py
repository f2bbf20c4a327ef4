r"""The printed report and the files of ``lowrank-ggn`` (see :mod:`lowrank_ggn.app.cli`).

The report dict has ``"settings"``, ``"models"`` (one entry per model, as built by
:func:`lowrank_ggn.app.analysis.analyse`; keys starting with ``_`` are not written to
JSON) and ``"seconds_total"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank_ggn.app.models import NUM_CLASSES
from lowrank_ggn.app.results_folder import folder_problem, publish


def _fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4g}" for v in values)


def _model_report(name: str, e: dict[str, Any]) -> list[str]:
    lines = [f"[{name}]  D = {e['num_params']:,} parameters, {e['origin']}"]
    lines.append(f"  engine path   {e['path']['name']}: {e['path']['reason']}")
    if e.get("engine"):
        passes = ", ".join(f"{k} {v}" for k, v in e["engine"]["passes"].items())
        lines.append(
            f"  strategy      {e['engine']['strategy']} / {e['engine']['solver']} "
            f"({passes} passes)"
        )
    ce = "CrossEntropyLoss" in e["loss"]
    bound = ""
    if ce and e["zoo"] and not e["approximation"]:  # zoo outputs: [N, 10] logits
        n = e["num_columns"] // NUM_CLASSES
        bound = f"; softmax CE allows at most N·(C−1) = {n * (NUM_CLASSES - 1)}"
    summed = (
        "Gram summed in float64"
        if e["accumulate"] == "float64"
        else "Gram summed in the model's dtype"
    )
    lines.append(
        f"  nonzero       {e['num_nonzero']} eigenvalues of N·C = {e['num_columns']} "
        f"Gram columns resolved to 1e-3 ({summed}{bound})"
    )
    if e["num_unresolved"]:
        lines.append(
            f"  unresolved    {e['num_unresolved']} eigenvalues at or below "
            f"{e['threshold']:.2g} (error model; shaded in the plots)"
        )
    if e["approximation"]:
        lines.append(
            f"  approximation {e['approximation']} (eigenvalues are estimates)"
        )
    lines.append(
        f"  top-{len(e['top_eigenvalues'])}         {_fmt(e['top_eigenvalues'])}"
    )
    c = e["trace_check"]
    if c.get("dense_trace") is None:
        lines.append(f"  trace check   Σλ = {c['sum_eigenvalues']:.10g}; {c['note']}")
    else:
        what = "trace check  " if c["exact"] else "exact trace  "
        lines.append(
            f"  {what} Σλ = {c['sum_eigenvalues']:.12g} vs tr G = {c['dense_trace']:.12g} "
            f"(brute-force torch.func GGN): rel. diff {c['relative_difference']:.1e}"
        )
        if "max_eigenvector_residual_rel" in c:
            lines.append(
                f"  eigenvectors  max_k ‖G e_k − λ_k e_k‖ / λ_1 = "
                f"{c['max_eigenvector_residual_rel']:.1e}"
            )
    mass = e["top_eigenvector_layer_mass"]
    if mass and e["top_eigenvalues"]:
        best = sorted(mass, key=lambda n: -mass[n][0])[:3]
        lines.append(
            "  e_1 lives in  " + ", ".join(f"{n} {100 * mass[n][0]:.0f}%" for n in best)
        )
    if "blocks" in e:
        total = sum(sum(b["eigenvalues"]) for b in e["blocks"].values())
        lines.append(
            f"  per layer     Σ over blocks of Σλ = {total:.12g} (= tr G: the "
            "block-diagonal keeps the trace)"
        )
        for bname, b in e["blocks"].items():
            ev = b["eigenvalues"]
            lines.append(
                f"    {bname:<14} D = {b['num_params']:>6,}  nonzero {len(ev):>5}  "
                f"λ_max {ev[0] if ev else 0.0:.4g}  Σλ {sum(ev):.4g}"
            )
    timing = f"spectrum and top-{len(e['top_eigenvalues'])} eigenvectors {e['seconds_spectrum']:.2f} s"
    if c.get("seconds") is not None:
        timing += f", brute-force check {c['seconds']:.2f} s"
    if e.get("seconds_structure_moments") is not None:
        timing += f", audit and moments {e['seconds_structure_moments']:.2f} s"
    lines.append(f"  time          {timing}")
    lines.extend(e["_extra_lines"])
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The printed report: settings, one block per model, warnings, outputs."""
    s = report["settings"]
    head = (
        f"lowrank-ggn {s['version']}: exact GGN spectra, batch N = {s['batch_size']}, "
        f"{s['data']}, loss {s['loss']}, {s['dtype']}, {s['device']}, seed {s['seed']}"
    )
    lines = [head, ""]
    for name, e in report["models"].items():
        lines.extend(_model_report(name, e))
        lines.append("")
    # ISSUE 5 HOOK: the structure table goes here (see structure_and_moments).
    warns = sorted({w for e in report["models"].values() for w in e["warnings"]})
    lines.append("warnings      " + ("none" if not warns else warns[0]))
    lines.extend("              " + w for w in warns[1:])
    lines.append(f"total time    {report['seconds_total']:.1f} s")
    return "\n".join(lines)


def _label(name: str, e: dict[str, Any]) -> str:
    if e["path"]["mixing_modules"]:
        return f"{name} (BN, train mode)"
    return name


#: Every file a run may write (the figures as .png and .pdf): an earlier run's files
#: with these names are replaced, the ones a run does not write are removed.
OUTPUTS = (
    "spectrum.json",
    "top_eigenvectors.pt",
    *(f"{stem}.{ext}" for stem in ("spectrum", "approximation", "per_layer")
      for ext in ("png", "pdf")),
)  # fmt: skip


def output_problem(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` cannot take this run's results (checked before any work), or ``None``."""
    return folder_problem(out, overwrite, OUTPUTS)


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    """``spectrum.json``, ``spectrum.png``/``.pdf``, ``top_eigenvectors.pt`` (+ extras).

    The files go into a run folder of their own inside ``out`` and appear in ``out``
    with one atomic switch (:func:`lowrank_ggn.app.results_folder.publish`): an
    interrupted run leaves the earlier run's results or this run's, never a mix, and
    files other than results are kept.
    """
    return publish(
        out, lambda folder: _write_files(report, folder), report["settings"], OUTPUTS
    )


def _write_files(report: dict[str, Any], out: Path) -> list[Path]:
    """Write every output file into ``out``; return their paths."""
    from lowrank_ggn.app import plotting

    models = report["models"]
    written = []
    torch.save(
        {n: e["_vectors"].detach().cpu() for n, e in models.items()},
        out / "top_eigenvectors.pt",
    )
    written.append(out / "top_eigenvectors.pt")
    public = {
        **report,
        "models": {
            n: {k: v for k, v in e.items() if not k.startswith("_")}
            for n, e in models.items()
        },
    }
    (out / "spectrum.json").write_text(json.dumps(public, indent=1))
    written.append(out / "spectrum.json")
    spectra = {_label(n, e): e["eigenvalues"] for n, e in models.items()}
    floor = max((e["threshold"] for e in models.values()), default=0.0)
    fig = plotting.spectrum_figure(spectra, unresolved=floor or None)
    written += plotting.save_figure(fig, out / "spectrum")
    if any("exact_eigenvalues" in e for e in models.values()):
        fig, axes = plotting.new_figure(ncols=len(models))
        for ax, (n, e) in zip(axes, models.items()):
            plotting.compare_spectra(
                {"exact": e["exact_eigenvalues"], "approximation": e["eigenvalues"]}, ax
            )
            ax.set_title(_label(n, e), fontsize=plotting.FONT_SIZE)
        written += plotting.save_figure(fig, out / "approximation")
    if any("blocks" in e for e in models.values()):
        fig, axes = plotting.new_figure(ncols=len(models))
        for ax, (n, e) in zip(axes, models.items()):
            plotting.compare_spectra(
                {
                    f"module {b} (D = {v['num_params']})": v["eigenvalues"]
                    for b, v in e["blocks"].items()
                },
                ax,
            )
            ax.set_title(
                f"{_label(n, e)}: per-layer blocks", fontsize=plotting.FONT_SIZE
            )
        written += plotting.save_figure(fig, out / "per_layer")
    return written
