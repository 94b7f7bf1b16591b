"""The toy world's results table (results.md and the job's printout)."""

from __future__ import annotations

ROWS = ("base", "finetune", "ours", "ours_auto")
ROW_NAMES = {
    "base": "base (CFG, no domain)",
    "finetune": "vanilla fine-tuning",
    "ours": "ours",
    "ours_auto": "ours, the paper's automatic weights",
}
FAMILY_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3"}
COLUMNS = (
    ("colour_accuracy", "colour acc ↑"),
    ("shape_accuracy", "shape acc"),
    ("no_object_rate", "no object ↓"),
    ("dark_fraction", "domain fidelity (dark) ↑"),
    ("fid", "FID, tiny extractor ↓"),
)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def results_markdown(results: dict) -> str:
    """Markdown: the table (one row per method), then settings, timings and machine load."""
    s = results["settings"]
    b = s["budget"]["finetune"]
    family = s.get("family", "sd15")
    title = "" if family == "sd15" else f" ({FAMILY_TITLES.get(family, family)} toy base)"
    # SD3's flow-matching Euler is kept for "dpm++" (idgen.pipelines.InDomainSD3Pipeline)
    solver = "flow-matching Euler" if family == "sd3" else "DPM-Solver++"
    lines = [
        f"# Toy world{title}: base vs vanilla fine-tuning vs ours",
        "",
        f"Same prompts and seeds in every row: {len(s['prompts'])} prompts x "
        f"{s['images_per_prompt']} images, {solver} {s['sample_steps']} steps, text "
        f"guidance w_c={s['w_c']}; ours adds domain guidance w_d={s['w_d']} (the automatic "
        f"weights row: w0={s.get('w0', 7.0)}, weights set per sample at the first step). Training budget: "
        f"{b['steps']} steps at batch {b['batch_size']}, lr {b['lr']:g} on {b['num_images']} "
        f"domain images for ours' null-text {'transformer' if family == 'sd3' else 'UNet'} and for the baseline (ours also "
        f"{s['budget']['ours']['inversion_steps']} steps of text-feature inversion).",
        "",
        "| method | " + " | ".join(title for _, title in COLUMNS) + " | n |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row, m in results["rows"].items():
        cells = [_fmt(m.get(key, "-")) for key, _ in COLUMNS]
        lines.append(
            f"| {ROW_NAMES.get(row, row)} | "
            + " | ".join(cells)
            + f" | {m.get('num_samples', '?')} |"
        )
    load = results["load_average"]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
    lines += [
        "",
        "Colour/shape accuracy: pixel statistics against the prompt (idgen.toyworld.metrics; no "
        "object counts as wrong; shape is a weak signal, ~0.6 even for the base). Domain "
        "fidelity: fraction of samples with a dark background. FID uses the tiny random-conv "
        "feature extractor against the domain images: it is NOT Inception FID.",
        "",
        f"Time: {timings} (torch threads {s['threads']}, {results['cpu_count']} CPUs, load "
        f"average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end).",
        "",
        f"![comparison]({'comparison.png'})",
        "",
    ]
    return "\n".join(lines)
