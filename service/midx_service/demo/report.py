"""Output of the main job: the terminal table, the JSON object, the plot and the docs section."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midx_service.demo.training import RunResult, TrainingConfig

START_MARKER = "<!-- demo:start -->"
END_MARKER = "<!-- demo:end -->"


@dataclass(frozen=True)
class RunContext:
    """The setting of a run of the main job, printed next to its results."""

    command: str
    transport: str
    num_classes: int
    num_train_tokens: int
    num_heldout_tokens: int
    eval_tokens: int
    unigram_weights: str
    midx_index: str
    machine: str
    total_seconds: float


def results_json(results: Sequence[RunResult], config: TrainingConfig, context: RunContext) -> dict[str, Any]:
    """Return the JSON object `--json` prints: `results` plus the budget and the context."""
    return {
        "results": [
            {
                "sampler": result.sampler,
                "perplexity": result.perplexity,
                "seconds": result.seconds,
                "seconds_per_step": result.seconds_per_step,
                "service_share": result.service_share,
                "setup_seconds": result.setup_seconds,
                "steps": result.steps,
                "curve": [
                    {"step": point.step, "seconds": point.seconds, "perplexity": point.perplexity}
                    for point in result.curve
                ],
            }
            for result in results
        ],
        "config": {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "num_samples": config.num_samples,
            "context": config.context,
            "hidden": config.hidden,
            "push_every": config.push_every,
            "seed": config.seed,
        },
        "context": context.__dict__,
    }


def format_table(results: Sequence[RunResult], initial_perplexity: float) -> str:
    """Return the plain-text results table printed at the end of the run."""
    header = f"{'sampler':<10} {'perplexity':>11} {'seconds':>9} {'s/step':>8} {'step vs full':>13} {'on service':>11}"
    lines = [header, "-" * len(header)]
    full_step = _full_seconds_per_step(results)
    for result in results:
        speed = f"{result.seconds_per_step / full_step:.3f}x" if full_step else "-"
        lines.append(
            f"{result.sampler:<10} {result.perplexity:>11.1f} {result.seconds:>9.1f} "
            f"{result.seconds_per_step:>8.3f} {speed:>13} {100 * result.service_share:>10.0f}%"
        )
    lines.append(f"(held-out perplexity before training: {initial_perplexity:.0f})")
    return "\n".join(lines) + "\n"


def render_markdown(
    results: Sequence[RunResult],
    config: TrainingConfig,
    context: RunContext,
    initial_perplexity: float,
    plot_name: str | None,
) -> str:
    """Return the docs/benchmarks.md section with the table, the setting and the plot."""
    today = datetime.date.today().isoformat()
    lines = [
        "## Main job: next-word training through the service",
        "",
        f"Measured with `{context.command}` on {today}, {context.machine}. A next-word model (the previous "
        f"{config.context} words' GloVe vectors, a {config.hidden}-unit hidden layer, a 50-dimensional query) is "
        f"trained on {context.num_train_tokens:,} tokens of standard-library docstrings and pydoc topics. Its "
        f"output layer is the {context.num_classes:,} x 50 GloVe table, fine-tuned: sampled runs push the changed "
        f"rows to the service every {config.push_every} steps and sample with `min_version`. Every sampler gets "
        f"the same {config.steps} steps of {config.batch_size} words and the same starting point; sampled runs "
        f"draw M = {config.num_samples} negatives per word over {context.transport}. Perplexity is the full "
        f"softmax over all {context.num_classes:,} classes on {context.eval_tokens:,} held-out words "
        f"({initial_perplexity:,.0f} before training). Seconds count training steps only, not the held-out "
        f"evaluations or the table upload; service is the share of them spent waiting for sample and "
        f"row-update calls. The whole job, with the corpus, the uploads and the evaluations, took "
        f"{context.total_seconds:.0f} s.",
        "",
        f"The unigram sampler draws by {context.unigram_weights}; midx-rq is {context.midx_index}.",
        "",
        "| sampler | held-out perplexity | perplexity vs full | seconds | seconds per step | step time vs full "
        "| waiting on service |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    full = next((result for result in results if result.sampler == "full"), None)
    for result in results:
        perplexity_ratio = speed = "-"
        if full is not None:
            perplexity_ratio = f"{result.perplexity / full.perplexity:.2f}"
            speed = f"{result.seconds_per_step / full.seconds_per_step:.3f}" if full.seconds_per_step else "-"
        lines.append(
            f"| {result.sampler} | {result.perplexity:.1f} | {perplexity_ratio} | {result.seconds:.1f} "
            f"| {result.seconds_per_step:.3f} | {speed} | {100 * result.service_share:.0f}% |"
        )
    if plot_name is not None:
        lines += ["", f"![held-out perplexity against training time]({plot_name})"]
    return "\n".join(lines) + "\n"


def replace_section(path: Path, body: str) -> None:
    """Write `body` between the demo markers of `path`, keeping the rest of the file as it is."""
    section = f"{START_MARKER}\n{body}{END_MARKER}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if START_MARKER in text and END_MARKER in text and text.index(START_MARKER) < text.index(END_MARKER):
        before = text[: text.index(START_MARKER)]
        after = text[text.index(END_MARKER) + len(END_MARKER) :].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_plot(results: Sequence[RunResult], path: Path) -> None:
    """Draw held-out perplexity against training seconds, one line per sampler, to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for result in results:
        # The shared starting point (step 0) is left out: its perplexity dwarfs the rest on a log scale.
        points = [point for point in result.curve if point.step > 0]
        axes.plot(
            [point.seconds for point in points],
            [point.perplexity for point in points],
            marker="o",
            label=result.sampler,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("training time (s, log scale)")
    axes.set_ylabel("held-out perplexity (full softmax, log scale)")
    axes.set_title("Next-word model with a GloVe output layer")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _full_seconds_per_step(results: Sequence[RunResult]) -> float:
    for result in results:
        if result.sampler == "full" and result.seconds_per_step > 0:
            return result.seconds_per_step
    return 0.0
