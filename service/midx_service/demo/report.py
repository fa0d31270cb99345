"""Output of the main job: the terminal table, the JSON object, the plot and the docs section."""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midx_service.demo.training import CurvePoint, RefitPoint, RunResult, TrainingConfig

START_MARKER = "<!-- demo:start -->"
END_MARKER = "<!-- demo:end -->"


@dataclass(frozen=True)
class RunContext:
    """The setting of a run of the main job, printed next to its results."""

    command: str
    transport: str
    num_classes: int
    num_train_tokens: int
    eval_tokens: int
    unigram_weights: str
    midx_index: str
    machine: str
    total_seconds: float


@dataclass(frozen=True)
class SamplerSummary:
    """The runs of one sampler over the job's seeds: perplexity as mean and sample standard deviation."""

    sampler: str
    runs: tuple[RunResult, ...]

    @property
    def perplexity(self) -> float:
        return statistics.fmean(run.perplexity for run in self.runs)

    @property
    def perplexity_std(self) -> float:
        """Sample standard deviation over the runs; 0 for a single run."""
        return statistics.stdev(run.perplexity for run in self.runs) if len(self.runs) > 1 else 0.0

    @property
    def seconds(self) -> float:
        return statistics.fmean(run.seconds for run in self.runs)

    @property
    def seconds_per_step(self) -> float:
        return statistics.fmean(run.seconds_per_step for run in self.runs)

    @property
    def service_share(self) -> float:
        return statistics.fmean(run.service_share for run in self.runs)

    @property
    def refit_seconds(self) -> float:
        return statistics.fmean(run.refit_seconds for run in self.runs)

    @property
    def refits(self) -> list[RefitPoint]:
        """The learned refits of all the runs, run by run."""
        return [point for run in self.runs for point in run.refits]

    def mean_curve(self) -> list[CurvePoint]:
        """Return the curve averaged over the runs, point by point; every run evaluates at the same steps."""
        return [
            CurvePoint(
                points[0].step,
                statistics.fmean(point.seconds for point in points),
                statistics.fmean(point.perplexity for point in points),
            )
            for points in zip(*(run.curve for run in self.runs), strict=True)
        ]


def summarise(results: Sequence[RunResult]) -> list[SamplerSummary]:
    """Group the runs by sampler, in the order the samplers first ran."""
    runs: dict[str, list[RunResult]] = {}
    for result in results:
        runs.setdefault(result.sampler, []).append(result)
    return [SamplerSummary(sampler, tuple(group)) for sampler, group in runs.items()]


def results_json(results: Sequence[RunResult], config: TrainingConfig, context: RunContext) -> dict[str, Any]:
    """Return the JSON object `--json` prints: every run, a summary per sampler, the budget and the context."""
    return {
        "results": [_run_json(result) for result in results],
        "summary": [
            {
                "sampler": summary.sampler,
                "runs": len(summary.runs),
                "perplexity": summary.perplexity,
                "perplexity_std": summary.perplexity_std,
                "seconds": summary.seconds,
                "seconds_per_step": summary.seconds_per_step,
                "service_share": summary.service_share,
                "refit_seconds": summary.refit_seconds,
            }
            for summary in summarise(results)
        ],
        "config": {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "num_samples": config.num_samples,
            "context": config.context,
            "hidden": config.hidden,
            "push_every": config.push_every,
            "kl_refit_every": config.kl_refit_every,
            "seeds": _seeds(results),
        },
        "context": context.__dict__,
    }


def _run_json(result: RunResult) -> dict[str, Any]:
    return {
        "sampler": result.sampler,
        "seed": result.seed,
        "perplexity": result.perplexity,
        "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step,
        "service_share": result.service_share,
        "setup_seconds": result.setup_seconds,
        "steps": result.steps,
        "curve": [
            {"step": point.step, "seconds": point.seconds, "perplexity": point.perplexity} for point in result.curve
        ],
        "refits": [
            {
                "step": point.step,
                "accepted": point.outcome.accepted,
                "seconds": point.outcome.seconds,
                "heldout_kl_before": point.outcome.heldout_kl_before,
                "heldout_kl_after": point.outcome.heldout_kl_after,
            }
            for point in result.refits
        ],
    }


def format_table(results: Sequence[RunResult]) -> str:
    """Return the plain-text results table printed at the end of the run, one row per sampler."""
    summaries = summarise(results)
    header = (
        f"{'sampler':<11} {'perplexity':>15} {'seconds':>9} {'s/step':>8} {'step vs full':>13} "
        f"{'on service':>11} {'runs':>5}"
    )
    lines = [header, "-" * len(header)]
    full_step = _full_seconds_per_step(summaries)
    for summary in summaries:
        speed = f"{summary.seconds_per_step / full_step:.3f}x" if full_step else "-"
        lines.append(
            f"{summary.sampler:<11} {_perplexity_text(summary):>15} {summary.seconds:>9.1f} "
            f"{summary.seconds_per_step:>8.3f} {speed:>13} {100 * summary.service_share:>10.0f}% "
            f"{len(summary.runs):>5}"
        )
    lines.append(f"(held-out perplexity before training: {_initial_perplexity(results):.0f})")
    lines += [_refit_sentence(summary) for summary in summaries if summary.refits]
    return "\n".join(lines) + "\n"


def render_markdown(
    results: Sequence[RunResult], config: TrainingConfig, context: RunContext, plot_name: str | None
) -> str:
    """Return the docs/benchmarks.md section with the table, the setting and the plot."""
    today = datetime.date.today().isoformat()
    summaries = summarise(results)
    seeds = _seeds(results)
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
        f"({_initial_perplexity(results):,.0f} before training). Seconds count training steps only, not the "
        f"held-out evaluations or the table upload; service is the share of them spent waiting for sample, "
        f"row-update and refit calls. The whole job, with the corpus, the uploads and the evaluations, took "
        f"{context.total_seconds:.0f} s.",
        "",
        f"The unigram sampler draws by {context.unigram_weights}. midx-rq is {context.midx_index}.",
    ]
    if len(seeds) > 1:
        lines += [
            "",
            f"Each sampler was trained once per seed ({', '.join(map(str, seeds))}); the seed sets the data "
            "order, the starting model and the draws, but not the held-out words. Perplexity is "
            "the mean over the seeds with the sample standard deviation; the other columns are means.",
        ]
    lines += [
        "",
        "| sampler | held-out perplexity | perplexity vs full | seconds | seconds per step | step time vs full "
        "| waiting on service |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    full = next((summary for summary in summaries if summary.sampler == "full"), None)
    for summary in summaries:
        perplexity_ratio = speed = "-"
        if full is not None:
            perplexity_ratio = f"{summary.perplexity / full.perplexity:.2f}"
            speed = f"{summary.seconds_per_step / full.seconds_per_step:.3f}" if full.seconds_per_step else "-"
        lines.append(
            f"| {summary.sampler} | {_perplexity_text(summary)} | {perplexity_ratio} | {summary.seconds:.1f} "
            f"| {summary.seconds_per_step:.3f} | {speed} | {100 * summary.service_share:.0f}% |"
        )
    if len(seeds) > 1:
        lines += ["", _per_seed_table(summaries, seeds)]
    for summary in summaries:
        if summary.refits:
            lines += ["", *_refit_markdown(summary)]
    if plot_name is not None:
        lines += ["", f"![held-out perplexity against training time]({plot_name})"]
    return "\n".join(lines) + "\n"


def _per_seed_table(summaries: Sequence[SamplerSummary], seeds: Sequence[int]) -> str:
    header = "| sampler | " + " | ".join(f"seed {seed}" for seed in seeds) + " |"
    rows = [header, "|---|" + "---:|" * len(seeds)]
    for summary in summaries:
        by_seed = {run.seed: run.perplexity for run in summary.runs}
        cells = [f"{by_seed[seed]:.1f}" if seed in by_seed else "-" for seed in seeds]
        rows.append(f"| {summary.sampler} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _refit_steps(summary: SamplerSummary) -> list[tuple[int, float, float]]:
    """Return (step, mean KL before, mean KL after) of the learned refits at each step, over the runs."""
    points = summary.refits
    rows = []
    for step in sorted({point.step for point in points}):
        at_step = [point.outcome for point in points if point.step == step]
        before = statistics.fmean(outcome.heldout_kl_before for outcome in at_step)
        after = statistics.fmean(outcome.heldout_kl_after for outcome in at_step)
        rows.append((step, before, after))
    return rows


def _refit_counts(summary: SamplerSummary) -> tuple[int, int]:
    """Return how many of the sampler's learned refits were accepted, and how many ran."""
    refits = summary.refits
    return sum(point.outcome.accepted for point in refits), len(refits)


def _refit_sentence(summary: SamplerSummary) -> str:
    """Summarise a sampler's learned refits in one line of the terminal output."""
    steps = _refit_steps(summary)
    accepted, total = _refit_counts(summary)
    first_and_last = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    changes = ", ".join(f"{before:.2f} -> {after:.2f} at step {step}" for step, before, after in first_and_last)
    return (
        f"{summary.sampler}: {accepted} of {total} learned refits accepted, {summary.refit_seconds:.1f} s per run. "
        f"Held-out KL(P || Q) {changes}"
    )


def _refit_markdown(summary: SamplerSummary) -> list[str]:
    """Describe a sampler's learned refits: when, how long, and the KL each one measured."""
    steps = _refit_steps(summary)
    accepted, total = _refit_counts(summary)
    lines = [
        f"{summary.sampler} had the service learn its codebooks by KL after steps "
        f"{', '.join(str(step) for step, _, _ in steps)}, from the queries the service recorded. {accepted} of "
        f"{total} refits were accepted. They took {summary.refit_seconds:.1f} s per run, which counts in its "
        "seconds because the trainer waits for them. The proposal's KL(P || Q) in nats on each refit's held-out "
        "queries, averaged over the runs:",
        "",
        "| after step | KL before the refit | KL after the refit |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {step} | {before:.3f} | {after:.3f} |" for step, before, after in steps]
    return lines


def _perplexity_text(summary: SamplerSummary) -> str:
    if len(summary.runs) == 1:
        return f"{summary.perplexity:.1f}"
    return f"{summary.perplexity:.1f} ± {summary.perplexity_std:.1f}"


def _seeds(results: Sequence[RunResult]) -> list[int]:
    return sorted({result.seed for result in results})


def _initial_perplexity(results: Sequence[RunResult]) -> float:
    return statistics.fmean(result.curve[0].perplexity for result in results)


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
    """Draw held-out perplexity against training seconds, one line per sampler (mean over seeds), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for summary in summarise(results):
        # The shared starting point (step 0) is left out: its perplexity dwarfs the rest on a log scale.
        points = [point for point in summary.mean_curve() if point.step > 0]
        axes.plot(
            [point.seconds for point in points],
            [point.perplexity for point in points],
            marker="o",
            label=summary.sampler,
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


def _full_seconds_per_step(summaries: Sequence[SamplerSummary]) -> float:
    for summary in summaries:
        if summary.sampler == "full" and summary.seconds_per_step > 0:
            return summary.seconds_per_step
    return 0.0
