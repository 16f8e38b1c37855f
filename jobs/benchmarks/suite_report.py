"""The markdown tables of `facegen bench suite`, ready to paste into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

SECTION_ORDER = ("correctness", "generator", "embedder", "evaluate", "privacy", "png", "end_to_end", "overlap",
                 "compile", "train")


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def format_markdown(record: dict) -> str:
    s = record["sections"]
    lines = [f"### facegen bench suite{' --quick' if record['quick'] else ''}: {record['device']}, "
             f"{record.get('seconds', 0):.0f} s", ""]
    env = s.get("environment", {})
    if "versions" in env:
        peak = env["peak"]
        lines += [f"Device: {env.get('gpu', peak.get('model'))}; " + ", ".join(
            f"{k} {v}" for k, v in env["versions"].items()) + (f", CUDA {env['cuda']}" if "cuda" in env else ""),
            f"Peak used for rooflines: {peak.get('tflops')} TFLOP/s ({peak.get('source')}).", ""]
    for name in SECTION_ORDER:
        if name in s and "error" in s[name]:
            lines += [f"**{name}: error** {s[name]['error']}", ""]
    c = s.get("correctness", {})
    if "generator" in c:
        lines += ["| check | precision | result |", "|---|---|---|"]
        for dtype, g in c["generator"].items():
            if "max_abs_diff" in g:
                lines.append(f"| generator vs fp32 (batch {c['batch']}) | {dtype} | max abs diff "
                             f"{g['max_abs_diff']:.3g}; uint8 levels changed {_pct(g['uint8_changed_fraction'])}, "
                             f"at most {g['uint8_max_level_change']} |")
        for dtype, e in c["embedder"].items():
            if "min_cosine_to_fp32" in e:
                lines.append(f"| embedder vs fp32, same images | {dtype} | min cosine {e['min_cosine_to_fp32']:.6f}; "
                             f"max similarity change {e['max_similarity_change']:.2e} |")
        for backend, r in c.get("search", {}).items():
            same = "identical" if r["identical_top1"] else "DIFFERENT"
            lines.append(f"| {backend} search vs exact float64 | fp32 | top-1 {same}; "
                         f"max abs diff {r['max_abs_diff']:.1e} |")
        lines.append("")
    for name, unit in (("generator", "images/s"), ("embedder", "images/s")):
        section = s.get(name, {})
        if "rows" not in section:
            continue
        what = section.get("model") or f"{section.get('resolution')}²"
        lines += [f"{name}: {what}, "
                  f"{section['flops_per_image'] / 1e9:.2f} GFLOP/image", "",
                  f"| precision | path | batch | {unit} | ms/image | roofline |", "|---|---|---:|---:|---:|---:|"]
        for r in section["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['dtype']} | {r.get('path', '–')} | {r['batch']} | {r['skipped']} | | |")
            else:
                lines.append(f"| {r['dtype']} | {r.get('path', '–')} | {r['batch']} | {r['images_per_s']:.2f} | "
                             f"{r['ms_per_image']:.2f} | {_pct(r['roofline_share'])} |")
        lines.append("")
    ev = s.get("evaluate", {})
    if "rows" in ev:
        lines += [f"Bundle.evaluate at {ev['enrolled']:,} enrolled:", "",
                  "| precision | batch | candidates/s | roofline |", "|---|---:|---:|---:|"]
        lines += [f"| {r['dtype']} | {r.get('batch', '–')} | {_fmt(r.get('candidates_per_s', r.get('skipped')))} | "
                  f"{_pct(r.get('roofline_share'))} |" for r in ev["rows"]]
        lines.append("")
    pr = s.get("privacy", {})
    if "rows" in pr:
        lines += ["| enrolled | backend | µs/candidate | roofline |", "|---:|---|---:|---:|"]
        lines += [f"| {r['enrolled']:,} | {r.get('backend', '–')} | "
                  f"{_fmt(r.get('us_per_candidate', r.get('skipped')))} | {_pct(r.get('roofline_share'))} |"
                  for r in pr["rows"]]
        lines.append("")
    png = s.get("png", {})
    if "images_per_s_per_core" in png:
        lines += [f"PNG encode ({png['resolution']}² VIS + NIR): {png['images_per_s_per_core']:.1f} images/s per core, "
                  f"{_fmt(png['images_per_s_all_cores'], '.1f')} on {png['processes']} processes; cores to keep up "
                  f"with the generator's best rate: {_fmt(png['cores_to_match_generator'], '.1f')}.", ""]
    e2e = s.get("end_to_end", {})
    if "samples_per_s" in e2e:
        lines += [f"End to end ({e2e['job']}): {e2e['samples']} samples in {e2e['seconds']:.1f} s = "
                  f"{e2e['samples_per_s']:.2f} samples/s, {e2e['candidates_per_s']:.1f} candidates/s "
                  f"(roofline {_pct(e2e['roofline_share'])}).", ""]
    lines += _overlap_lines(s.get("overlap", {})) + _compile_lines(s.get("compile", {}))
    lines += _train_lines(s.get("train", {}))
    return "\n".join(lines)


def _overlap_lines(section: dict) -> list[str]:
    if "rows" not in section:
        return []
    lines = ["Phase 3 (expand, encode, write) with shard writing overlapped and inline, same job:", "",
             "| writing | shards | wall s | compute s | write s | wait s | samples/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in section["rows"]:
        name = "overlapped" if r["overlap"] else "inline"
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | | |")
        else:
            lines.append(f"| {name} | {r['shards']} | {r['wall_s']:.2f} | {r['compute_s']:.2f} | {r['write_s']:.2f} | "
                         f"{r['wait_s']:.2f} | {r['samples_per_s']:.2f} |")
    if "speedup" in section:
        same = "identical" if section["identical_shards"] else "DIFFERENT"
        lines.append(f"\nOverlapped vs inline: {section['speedup']:.2f}× phase 3 wall time; shards {same}.")
    return lines + [""]


def _compile_lines(section: dict) -> list[str]:
    if "compile_s" not in section:
        return []
    compiled = section["compiled_candidates_per_s"]
    rate = compiled if isinstance(compiled, str) else f"{compiled:.2f} ({section['speedup']:.2f}× eager)"
    return [f"torch.compile, {section['backend']} (Bundle.evaluate, batch {section['batch']}): "
            f"compiled in {section['compile_s']:.1f} s; "
            f"eager {section['eager_candidates_per_s']:.2f} candidates/s, compiled {rate}; largest difference "
            f"to eager: embedding {section['max_embedding_diff']:.1e}, "
            f"similarity {section['max_similarity_diff']:.1e}, "
            f"uint8 levels changed {_pct(section['uint8_changed_fraction'])} (at most "
            f"{section['uint8_max_level_change']}).", ""]


def _train_lines(section: dict) -> list[str]:
    if "phases" not in section and "workers" not in section:
        return []
    from facegen.jobs.benchmarks.train import format_results

    return ["```", format_results(section), "```", ""]
