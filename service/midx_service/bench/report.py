"""Rendering of benchmark results as the Markdown section kept in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START_MARKER = "<!-- core-benchmark:start -->"
END_MARKER = "<!-- core-benchmark:end -->"


def render_markdown(result: dict[str, Any], command: str) -> str:
    """Render a run_benchmark result; `command` is the command line that reproduces it."""
    machine = result["machine"]
    lines = [
        "## Index core",
        "",
        f"Command: `{command}` ({result['wall_seconds']:.0f} s). Machine: {machine['cpu']}, "
        f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, torch {machine['torch']}. "
        f"Table: {result['table']}, {result['num_classes']:,} x {result['dim']}. "
        f"B = {result['batch']} queries, M = {result['num_samples']} samples per query.",
        "",
        "| sampler | K | queries/s | ms per batch |",
        "| --- | ---: | ---: | ---: |",
    ]
    for entry in result["throughput"]:
        lines.append(
            f"| {entry['sampler']} | {_k(entry['num_codewords'])} | {entry['queries_per_second']:,.0f} | "
            f"{entry['seconds_per_batch'] * 1e3:.2f} |"
        )
    lines += ["", "| classes N | µs per query (midx-rq, K = 64) |", "| ---: | ---: |"]
    for entry in result["scaling"]:
        lines.append(f"| {entry['num_classes']:,} | {entry['seconds_per_query'] * 1e6:.2f} |")
    lines += [
        "",
        f"Build (midx-rq, K = 64): {result['build_seconds']:.2f} s. "
        f"Update of 1,000 rows: {result['update_1000_rows_seconds'] * 1e3:.1f} ms.",
        "",
        "| proposal | K | KL(P ‖ Q), nats | quantisation error |",
        "| --- | ---: | ---: | ---: |",
    ]
    for entry in result["kl"]:
        error = entry.get("quantization_error")
        lines.append(
            f"| {entry['sampler']} | {_k(entry['num_codewords'])} | {entry['kl']:.3f} | "
            f"{'' if error is None else f'{error:.3f}'} |"
        )
    lines += ["", "| target | measured | required | met |", "| --- | ---: | --- | --- |"]
    for name, target in result["targets"].items():
        lines.append(f"| {name} | {target['value']:.4g} | {target['target']} | {'yes' if target['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def replace_section(path: Path, body: str, name: str = "core-benchmark") -> None:
    """Write `body` between the `<!-- {name}:start -->` and `<!-- {name}:end -->` markers of `path`.

    The rest of the file is kept; without the markers, the section is appended.
    """
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start_marker}\n{body}{end_marker}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if start_marker in text and end_marker in text:
        before = text[: text.index(start_marker)]
        after = text[text.index(end_marker) + len(end_marker) :].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _k(num_codewords: int | None) -> str:
    return "" if num_codewords is None else str(num_codewords)
