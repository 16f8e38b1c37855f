"""`facegen eval-data`: how separable and diverse a dataset's identities are under a face embedder."""

from __future__ import annotations

import argparse
import base64
import html
import json
import os

from facegen.jobs.embedder_options import add_preprocessing_flag, preprocessing_flags, print_notes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-data",
        help="genuine/impostor distributions, EER, FNMR@FMR and per-identity spread of a dataset",
        description=(
            "Embed every sample of a generated dataset with a face embedder (insightface .pth, facegen "
            ".safetensors, .onnx) and measure how separable and diverse its identities are: genuine and "
            "impostor similarity distributions, EER, FNMR at FMR 1e-2 and 1e-3, and per identity the "
            "similarity of its own samples, their spread around its centroid and its nearest other identity. "
            "Writes OUT/eval-data.json, OUT/scores.png and OUT/eval-data.html."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="the dataset (local path or fsspec URI)")
    p.add_argument("--embedder", required=True, help="face embedder model file")
    add_preprocessing_flag(p)
    p.add_argument("--mode", choices=["vis", "nir"], default="vis", help="which images to embed")
    p.add_argument("--max-impostors", type=int, default=1_000_000,
                   help="impostor pairs: all of them up to this many, else a seeded sample of this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch and pyarrow load only when the command runs, so `facegen --help` starts fast
    from facegen.engine.dataset_eval import dataset_separability, embed_dataset
    from facegen.engine.plots import histogram_png
    from facegen.engine.storage import Storage
    from facegen.models.loading import load_embedder

    embedder = load_embedder(args.embedder, **preprocessing_flags(args))
    print_notes(embedder)
    labels, embeddings = embed_dataset(Storage(args.dataset), embedder, args.mode, args.batch_size)
    print(f"embedded {len(labels)} samples of {len(set(labels.tolist()))} identities", flush=True)
    figures, genuine, impostor = dataset_separability(labels, embeddings, args.max_impostors, args.seed)
    figures = {"dataset": args.dataset, "embedder": args.embedder, "mode": args.mode, **figures}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval-data.json"), "w") as handle:
        json.dump(figures, handle, indent=2, sort_keys=True)
    markers = {"EER": figures["eer"]["threshold"]}
    markers.update({f"FMR {k}": v["threshold"] for k, v in figures["fnmr_at_fmr"].items()})
    png = histogram_png({"genuine": genuine, "impostor": impostor}, title=f"similarities: {args.dataset}",
                        markers=markers)
    with open(os.path.join(args.out, "scores.png"), "wb") as handle:
        handle.write(png)
    with open(os.path.join(args.out, "eval-data.html"), "w", encoding="utf-8") as handle:
        handle.write(render_html(figures, png))
    fnmr = ", ".join(f"FNMR@FMR={k} {v['fnmr']:.4f}" for k, v in figures["fnmr_at_fmr"].items())
    print(f"EER {figures['eer']['eer']:.4f}, {fnmr}; genuine mean {figures['genuine']['mean']:.3f}, impostor "
          f"mean {figures['impostor']['mean']:.3f}; wrote {args.out}/eval-data.json, scores.png, eval-data.html")
    return 0


def _rows(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append((prefix + key, value))
    return rows


def _table(rows: list[tuple[str, object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{cell(v)}</td></tr>" for k, v in rows)
    return f"<table><tr><th>figure</th><th>value</th></tr>{body}</table>"


def render_html(figures: dict, png: bytes) -> str:
    """One self-contained page: headline figures, the distributions, per-identity spread, worst identities."""
    worst = figures.get("worst_identities", [])
    worst_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</td>" for v in w.values())
        + "</tr>" for w in worst)
    worst_head = "".join(f"<th>{html.escape(k)}</th>" for k in (worst[0] if worst else {}))
    headline = [(k, v) for k, v in _rows(figures) if not k.startswith("per_identity.")]
    title, image = html.escape(figures["dataset"]), base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>eval-data: {title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style></head><body>
<h1>Identity separability and diversity</h1>
<p>{html.escape(figures['dataset'])}, embedder {html.escape(figures['embedder'])}, {figures['mode']} images:
{figures['samples']} samples of {figures['identities']} identities.</p>
<h2>Headline</h2>{_table(headline)}
<h2>Genuine and impostor similarities</h2><img alt="histograms" src="data:image/png;base64,{image}">
<h2>Per identity</h2>{_table(_rows(figures['per_identity']))}
<h2>Least separable identities</h2><table><tr>{worst_head}</tr>{worst_rows}</table>
</body></html>
"""
