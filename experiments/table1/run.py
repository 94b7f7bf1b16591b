"""Table 1 in one command: train ours + the five baselines, sample with the same seeds, evaluate.

    python experiments/table1/run.py --domain demo --sd tiny --steps 5 --out outputs/table1_demo
    python experiments/table1/run.py --domain data/ffhq --domain-name face --sd $SD15 \\
        --steps 20000 --batch-size 32 --resolution 512 --num-samples 50000 \\
        --inception $INCEPTION --clip /models/clip-vit-large-patch14 \\
        --attributes conf/metrics/face_attributes.yaml --controlnet /models/sd-controlnet-canny \\
        --canny-conditions data/celebahq_canny --sample-steps 100 --out outputs/table1

Writes ``<out>/<method>/{export, samples_*}`` and ``<out>/table/<method>/<column>/metrics.json``
(the layout of experiments/aggregate_table1.py), and prints FID, CLIP alignment, canny
discrepancy and #param per method. ``--sd tiny`` uses random tiny models everywhere (tiny
feature extractor for FID, a random tiny CLIP, a random ControlNet): the numbers only show
that the pipeline runs, not how the methods compare.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe import (  # noqa: E402
    ROWS,
    Budget,
    Sampling,
    default_attributes,
    evaluate_column,
    sample_canny,
    sample_text,
    train_baseline,
    train_ours,
    write_canny_conditions,
)

from idgen.data.demo import make_demo_domain  # noqa: E402
from idgen.metrics import Attribute, InceptionFeatures, TinyFeatureExtractor  # noqa: E402
from idgen.models import build_tiny_sd, load_sd  # noqa: E402
from idgen.models.tiny_clip import save_tiny_clip

HEADER = ["Method", "#param", "FID↓", "Text Align.↑", "Spatial Align.↓"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", required=True, help="folder of domain images, or 'demo'")
    p.add_argument("--domain-name", default=None, help="<domain> in prompts (demo: 'shapes')")
    p.add_argument("--sd", required=True, help="SD1.5 diffusers folder, or 'tiny'")
    p.add_argument("--out", type=Path, default=Path("outputs/table1"))
    p.add_argument("--methods", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--steps", type=int, required=True, help="training steps of every method")
    p.add_argument(
        "--inversion-steps", type=int, default=None, help="ours' stage 1 (default: steps)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512 SD")
    p.add_argument("--lr-ours", type=float, default=1e-5)
    p.add_argument("--num-samples", type=int, default=8, help="unconditional samples for FID")
    p.add_argument("--samples-per-attribute", type=int, default=2)
    p.add_argument("--num-canny", type=int, default=4, help="conditions (from the domain)")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--rectify", action="store_true", help="baselines: frozen SD's uncond (§4.5)")
    p.add_argument("--inception", default=None, help="Inception weights file (standard FID)")
    p.add_argument("--clip", default=None, help="CLIP folder; 'tiny' = random tiny CLIP")
    p.add_argument("--attributes", default=None, help="YAML with an `attributes` list")
    p.add_argument("--controlnet", default=None, help="canny ControlNet folder; 'tiny' = random")
    p.add_argument("--canny-conditions", default=None, help="folder of canny maps")
    p.add_argument(
        "--fid-column",
        default="fid",
        help="run-dir name of the FID column: face_fid/animal_fid/porcelain_fid for "
        "experiments/aggregate_table1.py",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_controlnet(spec: str | None, sd):
    if spec is None:
        return None
    from diffusers import ControlNetModel

    if spec == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ControlNetModel.from_unet(sd.unet)
    return ControlNetModel.from_pretrained(spec, torch_dtype=sd.unet.dtype).to(sd.unet.device)


def cell(results: dict, key: str, count: str) -> str:
    if key not in results:
        return "-"
    return f"{results[key]:.3f} (n={results.get(count, '?')})"


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def run(args: argparse.Namespace) -> list[list[str]]:
    out: Path = args.out
    tiny = args.sd == "tiny"
    resolution = args.resolution or (64 if tiny else 512)
    if args.domain == "demo":
        domain = make_demo_domain(out / "demo_domain", 32, resolution, args.seed)
        domain_name = args.domain_name or "shapes"
    else:
        domain, domain_name = Path(args.domain), args.domain_name or "domain"
        if not domain.is_dir():
            raise SystemExit(f"--domain '{domain}' is not a folder of images (or use 'demo').")
    loader = (
        functools.partial(build_tiny_sd, seed=0) if tiny else functools.partial(load_sd, args.sd)
    )
    budget = Budget(
        args.steps, args.inversion_steps or args.steps, args.batch_size, resolution, args.lr_ours
    )
    how = Sampling(args.sample_steps, args.guidance_scale, args.rectify)
    sd = loader()  # the frozen SD every method samples on (never trained)
    controlnet = load_controlnet(args.controlnet, sd)

    # metrics
    if args.inception:
        extractor = InceptionFeatures(weights_path=args.inception)
    else:
        extractor = TinyFeatureExtractor(seed=0, input_size=resolution)
    clip = str(save_tiny_clip(out / "tiny_clip")) if args.clip == "tiny" else args.clip
    if args.attributes:
        attributes = [Attribute(**a) for a in OmegaConf.load(args.attributes).attributes]
    else:
        attributes = default_attributes(domain_name)
    conditions = None
    if controlnet is not None:
        conditions = (
            Path(args.canny_conditions)
            if args.canny_conditions
            else write_canny_conditions(
                domain, out / "canny_conditions", args.num_canny, resolution
            )
        )
    metric_kw = dict(
        batch_size=32,
        device="cuda" if torch.cuda.is_available() else "cpu",
        cache_dir=out / "cache",
        seed=args.seed,
    )

    rows = [HEADER]
    for name in args.methods:
        method_dir = out / name
        # 1. train (same data, steps, batch) and export
        if name == "ours":
            trained = train_ours(loader, domain, domain_name, budget, method_dir, args.seed)
        else:
            trained = train_baseline(
                name, loader, domain, domain_name, budget, method_dir, args.seed
            )
        # 2. unconditional samples (same seeds for every method) -> FID
        jobs = [(f"{i:05d}", "", args.seed + i) for i in range(args.num_samples)]
        fid_dir = sample_text(trained, sd, jobs, method_dir / "samples_fid", how, domain_name)
        fid = evaluate_column(
            fid_dir,
            out / "table" / name / args.fid_column,
            reference_dir=domain,
            extractor=extractor,
            resolution=resolution,
            fid_options={"kid": False},
            **metric_kw,
        )
        # 3. attribute prompts -> CLIP alignment
        text = {}
        if clip is not None:
            jobs = [
                (f"{a}_{k:03d}", attr.prompt, args.seed + k)
                for a, attr in enumerate(attributes)
                for k in range(args.samples_per_attribute)
            ]
            text_dir = sample_text(trained, sd, jobs, method_dir / "samples_text", how, domain_name)
            text = evaluate_column(
                text_dir,
                out / "table" / name / "text_align",
                clip_model=clip,
                attributes=attributes,
                resolution=resolution,
                **metric_kw,
            )
        # 4. ControlNet canny conditions -> canny discrepancy
        spatial = {}
        if controlnet is not None:
            canny_dir = sample_canny(
                trained,
                sd,
                controlnet,
                conditions,
                method_dir / "samples_canny",
                how,
                domain_name,
                args.seed,
            )
            spatial = evaluate_column(
                canny_dir,
                out / "table" / name / "spatial_align",
                canny_options={"conditions_dir": str(conditions)},
                **metric_kw,
            )
        rows.append(
            [
                name,
                f"{trained.num_params:,}",
                cell(fid, "fid", "num_samples"),
                cell(text, "attribute_alignment", "attribute_num_samples"),
                cell(spatial, "canny_discrepancy", "canny_num_samples"),
            ]
        )
        (out / "table.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print(render(rows))


if __name__ == "__main__":
    main()
