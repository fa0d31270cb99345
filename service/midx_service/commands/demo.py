"""Run the main job: train a next-word model on real text with negatives from the service, per sampler."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from midx_service.core import IndexConfig
from midx_service.demo.report import (
    RunContext,
    format_table,
    render_markdown,
    replace_section,
    results_json,
    write_plot,
)
from midx_service.demo.training import (
    KL_REFIT_SAMPLERS,
    SAMPLERS,
    SERVICE_SAMPLERS,
    Batches,
    Evaluator,
    RunResult,
    Trainer,
    TrainingConfig,
)

if TYPE_CHECKING:
    from midx_service.data.corpus import Split

logger = logging.getLogger(__name__)

DEFAULT_MARKDOWN = Path("docs/benchmarks.md")
DEFAULT_PLOT = Path("docs/demo-perplexity.png")
INDEX_NAME_PREFIX = "demo-glove-"

# The default budget is meant to finish all five samplers within 10 minutes on 2 CPU cores, and
# --quick within 3. With little else running, the 2-core development machine took about 5 minutes
# and 80 s (see docs/benchmarks.md). The full softmax and midx-rq-kl runs take most of that time.
FULL_BUDGET = TrainingConfig(steps=400, batch_size=128, eval_every=100, eval_tokens=1024)
QUICK_BUDGET = TrainingConfig(steps=80, batch_size=128, eval_every=20, eval_tokens=512, kl_refit_every=40)
DEFAULT_KL_REFIT_SECONDS = 20.0
# The service's own limit on kl_refit_time_budget_seconds (one day).
MAX_KL_REFIT_SECONDS = 86400.0
# Seed of the held-out sample; 1 keeps the words that runs with the default seed 0 were evaluated on.
HELDOUT_SEED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    service = parser.add_argument_group("service")
    service.add_argument(
        "--url",
        default=None,
        help="use a running service instead of starting one: http://HOST:PORT for REST, HOST:PORT for gRPC",
    )
    service.add_argument(
        "--transport",
        choices=("grpc", "rest"),
        default="grpc",
        help="client transport to the service started in the background (default grpc)",
    )
    service.add_argument(
        "--token", default=None, help="bearer token for --url (default: the MIDX_API_TOKEN environment variable)"
    )
    service.add_argument(
        "--index-name",
        default=None,
        help=f"name of the index the job creates and deletes again (default {INDEX_NAME_PREFIX}<random suffix>); "
        "the job stops if an index of that name exists",
    )
    service.add_argument(
        "--in-process",
        action="store_true",
        help="fallback for debugging the trainer: sample from an index in this process, without the service",
    )

    budget = parser.add_argument_group("budget")
    budget.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced budget ({QUICK_BUDGET.steps} steps of {QUICK_BUDGET.batch_size} words), under 3 minutes",
    )
    budget.add_argument("--steps", type=int, default=None, help="training steps per sampler")
    budget.add_argument("--batch-size", type=int, default=None, help="words per training step")
    budget.add_argument("--num-samples", type=int, default=None, help="negatives drawn per word (M)")
    budget.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    budget.add_argument("--eval-tokens", type=int, default=None, help="held-out words per evaluation")
    budget.add_argument("--seed", type=int, default=None, help="seed of the data order, model and draws (default 0)")
    budget.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds: train every sampler once per seed and report the mean perplexity and its "
        "standard deviation",
    )
    budget.add_argument(
        "--uncorrected-positive",
        action="store_true",
        help="leave the positive's logit uncorrected in the sampled loss (the classic sampled softmax); "
        "by default it is corrected by log(M Q) like the negatives",
    )
    budget.add_argument(
        "--samplers",
        default=",".join(SAMPLERS),
        help=f"comma-separated samplers to run, from {', '.join(SAMPLERS)} (default all)",
    )
    budget.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="keep only the first N GloVe words (the most frequent) as classes; words outside are dropped "
        "from the text (default all 400,000)",
    )

    sampler = parser.add_argument_group("samplers")
    sampler.add_argument("--num-codewords", type=int, default=64, help="codewords per codebook (K) of midx-rq")
    sampler.add_argument(
        "--midx-last-stage",
        choices=("uniform", "popularity"),
        default="uniform",
        help="how midx-rq draws inside a cell: uniformly, or by the unigram sampler's distribution (default uniform)",
    )
    sampler.add_argument(
        "--kl-refit-every",
        type=int,
        default=None,
        help=f"steps between the learned (KL) refits of midx-rq-kl (default {FULL_BUDGET.kl_refit_every}, "
        f"{QUICK_BUDGET.kl_refit_every} with --quick)",
    )
    sampler.add_argument(
        "--kl-refit-seconds",
        type=float,
        default=DEFAULT_KL_REFIT_SECONDS,
        help="time budget of one learned refit on the service the job starts (default "
        f"{DEFAULT_KL_REFIT_SECONDS:g}); with --url the server's MIDX_KL_REFIT_TIME_BUDGET_SECONDS applies",
    )
    sampler.add_argument(
        "--unigram-weights",
        choices=("zipf", "counts"),
        default="zipf",
        help="class weights of the unigram sampler: zipf, 1/(rank + 1) by GloVe frequency rank, or counts, "
        "word counts of the training text (unseen words get weight 0 and are never drawn). Default zipf",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object with the results on stdout")
    output.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"write the results section of this Markdown file (default {DEFAULT_MARKDOWN} without --quick)",
    )
    output.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"write the perplexity plot (PNG) here (default {DEFAULT_PLOT} without --quick)",
    )
    output.add_argument("--no-write", action="store_true", help="write neither the Markdown section nor the plot")


def run(args: argparse.Namespace) -> int:
    from midx_client import SamplerError
    from midx_service.data.glove import MissingDataError

    try:
        config = _training_config(args)
        samplers = _samplers(args.samplers)
        seeds = _seeds(args, config)
        config = replace(config, seed=seeds[0])
    except ValueError as error:
        print(f"midx-sampler demo: {error}", file=sys.stderr)
        return 2
    if args.kl_refit_every is not None and KL_REFIT_SAMPLERS.isdisjoint(samplers):
        logger.warning("--kl-refit-every applies only to the midx-rq-kl run, which --samplers leaves out")
    markdown_path, plot_path = _output_paths(args)
    started = time.perf_counter()
    # Other processes on the machine slow every step down; the load average goes next to the times.
    load_average = os.getloadavg()[0]
    try:
        if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
            raise MissingDataError(
                "the plot needs matplotlib, which is not installed; install the data extra "
                "(pip install 'midx-sampler[data]') or pass --no-write"
            )
        job = _prepare_job(args, config)
        results, transport = _run_samplers(args, job, samplers, seeds)
    except MissingDataError as error:
        print(f"midx-sampler demo: {error}", file=sys.stderr)
        return 1
    except SamplerError as error:
        print(f"midx-sampler demo: a call to the service failed: {error}", file=sys.stderr)
        return 1

    context = RunContext(
        command=_command_line(),
        transport=transport,
        num_classes=job.num_classes,
        num_train_tokens=job.train.num_tokens,
        eval_tokens=job.evaluator.num_tokens,
        unigram_weights=_describe_weights(args.unigram_weights),
        midx_index=_describe_midx(args, config),
        machine=f"{os.cpu_count()} CPU cores ({platform.machine()}, 1-minute load average {load_average:.1f} "
        f"at the start), torch {torch.__version__}",
        total_seconds=time.perf_counter() - started,
    )
    logger.info("main job finished in %.0f s", context.total_seconds)
    _write_outputs(results, config, context, markdown_path, plot_path)
    if args.json:
        json.dump(results_json(results, config, context), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(results))
    return 0


@dataclass(frozen=True)
class _Job:
    """The output table, the training text, the held-out evaluator and the (N,) unigram weights."""

    config: TrainingConfig
    glove: np.ndarray
    train: Split
    evaluator: Evaluator
    unigram_weights: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.glove.shape[0])

    def trainer(self, seed: int) -> Trainer:
        """Return the trainer of one seed: its own batch schedule and starting model, the shared evaluator."""
        config = replace(self.config, seed=seed)
        batches = Batches(self.train, config.context, config.batch_size, config.steps, seed)
        trainer = Trainer(config, self.glove, batches, self.evaluator, initial_perplexity=float("nan"))
        trainer.initial_perplexity = self.evaluator.perplexity(trainer.new_model(), torch.from_numpy(self.glove))
        logger.info("seed %d: held-out perplexity before training: %.0f", seed, trainer.initial_perplexity)
        return trainer


def _prepare_job(args: argparse.Namespace, config: TrainingConfig) -> _Job:
    """Load the table and the text, and pick the held-out words."""
    from midx_service.data.corpus import load_corpus
    from midx_service.data.glove import load_glove

    glove, _ = load_glove()
    num_classes = args.num_classes or glove.shape[0]
    glove = np.ascontiguousarray(glove[:num_classes])
    corpus = load_corpus()
    train = corpus.train.restricted(num_classes)
    heldout = corpus.heldout.restricted(num_classes)

    # The held-out words do not depend on the training seed, so perplexities of any two runs compare.
    evaluator = Evaluator(heldout, config.context, config.eval_tokens, HELDOUT_SEED)
    weights = _unigram_weights(args.unigram_weights, num_classes, train.tokens)
    return _Job(config, glove, train, evaluator, weights)


def _run_samplers(
    args: argparse.Namespace, job: _Job, samplers: list[str], seeds: list[int]
) -> tuple[list[RunResult], str]:
    """Train under each sampler once per seed; return the results and a description of the transport."""
    config = job.config
    index_config = IndexConfig(
        dim=job.glove.shape[1], num_codewords=args.num_codewords, last_stage=args.midx_last_stage
    )
    results: list[RunResult] = []
    with _negative_source(args, index_config) as (source, transport):
        for seed in seeds:
            trainer = job.trainer(seed)
            for sampler in samplers:
                logger.info(
                    "training with %s, seed %d (%d steps of %d words)", sampler, seed, config.steps, config.batch_size
                )
                if sampler == "full":
                    results.append(trainer.run(sampler))
                    continue
                weights = _weights_for(sampler, job.unigram_weights, index_config)
                try:
                    results.append(trainer.run(sampler, source, weights))
                finally:
                    source.close()
    return results, transport


def _write_outputs(
    results: list[RunResult],
    config: TrainingConfig,
    context: RunContext,
    markdown_path: Path | None,
    plot_path: Path | None,
) -> None:
    if plot_path is not None:
        write_plot(results, plot_path)
        logger.info("wrote the plot to %s", plot_path)
    if markdown_path is not None:
        plot_name = None if plot_path is None else os.path.relpath(plot_path, markdown_path.parent)
        replace_section(markdown_path, render_markdown(results, config, context, plot_name))
        logger.info("wrote the results section of %s", markdown_path)


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    config = QUICK_BUDGET if args.quick else FULL_BUDGET
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_samples": args.num_samples,
        "eval_every": args.eval_every,
        "eval_tokens": args.eval_tokens,
        "kl_refit_every": args.kl_refit_every,
        "seed": args.seed,
    }
    config = replace(config, **{name: value for name, value in overrides.items() if value is not None})
    if args.uncorrected_positive:
        config = replace(config, correct_positive=False)
    for name in ("steps", "batch_size", "num_samples", "eval_every", "eval_tokens", "kl_refit_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if args.num_classes is not None and args.num_classes < 2:
        raise ValueError(f"--num-classes must be at least 2, got {args.num_classes}")
    if not 0 < args.kl_refit_seconds <= MAX_KL_REFIT_SECONDS:
        raise ValueError(
            f"--kl-refit-seconds must be above 0 and at most {MAX_KL_REFIT_SECONDS:g}, got {args.kl_refit_seconds}"
        )
    if config.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {config.seed}")
    return config


def _seeds(args: argparse.Namespace, config: TrainingConfig) -> list[int]:
    """Return the seeds to train with: --seeds, else the single seed of the budget (--seed)."""
    if args.seeds is None:
        return [config.seed]
    if args.seed is not None:
        raise ValueError("--seed and --seeds are mutually exclusive; pass only one of them")
    try:
        seeds = [int(part) for part in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds takes distinct integers of 0 or more, got {args.seeds!r}")
    return seeds


def _samplers(text: str) -> list[str]:
    samplers = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in samplers if name not in SAMPLERS]
    if unknown or not samplers:
        raise ValueError(f"--samplers takes a comma-separated list from {', '.join(SAMPLERS)}, got {text!r}")
    return samplers


def _unigram_weights(kind: str, num_classes: int, train_tokens: np.ndarray) -> np.ndarray:
    if kind == "counts":
        return np.bincount(train_tokens, minlength=num_classes).astype(np.float64)
    return 1.0 / np.arange(1, num_classes + 1, dtype=np.float64)


def _weights_for(sampler: str, weights: np.ndarray, config: IndexConfig) -> np.ndarray:
    """Return the class weights to upload for `sampler`.

    The unigram sampler raises the uploaded weights to the power unigram_alpha itself, but the
    popularity last stage draws by the weights as they are. Raising them here makes midx-rq draw
    inside a cell by the same distribution that the unigram sampler draws from.
    """
    if SERVICE_SAMPLERS.get(sampler) == "midx" and config.last_stage == "popularity":
        return np.power(weights, config.unigram_alpha)
    return weights


def _describe_midx(args: argparse.Namespace, config: TrainingConfig) -> str:
    return (
        f"K = {args.num_codewords} residual quantisation with the {args.midx_last_stage} last stage on the "
        "k-means codebooks the service fits when the table is uploaded. midx-rq-kl is the same index, but "
        f"every {config.kl_refit_every} steps the trainer has the service relearn its codebooks by KL "
        f'(`rebuild(mode="kl")`, a time budget of {args.kl_refit_seconds:g} s per refit on the service the '
        "job starts)"
    )


def _describe_weights(kind: str) -> str:
    if kind == "counts":
        return "word counts of the training text, raised to the power 0.75 (unseen words are never drawn)"
    return "Zipf weights 1/(rank + 1) of the GloVe frequency rank, raised to the power 0.75"


@contextlib.contextmanager
def _negative_source(args: argparse.Namespace, config: IndexConfig) -> Iterator[tuple[Any, str]]:
    """Yield the negative source the arguments select and a description of its transport."""
    from midx_service.demo.sources import InProcessNegativeSource, ServiceNegativeSource

    if args.in_process:
        logger.warning("--in-process: sampling without the service; these results do not measure the service")
        source = InProcessNegativeSource(config, kl_refit_time_budget_seconds=args.kl_refit_seconds)
        yield source, "no service (in-process fallback)"
        return
    token = args.token or os.environ.get("MIDX_API_TOKEN") or None
    index_name = args.index_name or INDEX_NAME_PREFIX + secrets.token_hex(4)
    if args.url is not None:
        client, transport = _connect(args.url, token)
        with contextlib.closing(client):
            yield ServiceNegativeSource(client, index_name, config), f"{transport} to {args.url}"
        return

    from midx_service.demo.background import BackgroundServer

    # The background service listens on loopback only; a fresh token still keeps other local users out.
    background_token = secrets.token_urlsafe(24)
    with BackgroundServer(api_token=background_token, kl_refit_time_budget_seconds=args.kl_refit_seconds) as server:
        url = server.http_url if args.transport == "rest" else server.grpc_target
        logger.info("started the service in the background: REST %s, gRPC %s", server.http_url, server.grpc_target)
        client, transport = _connect(url, background_token)
        with contextlib.closing(client):
            yield ServiceNegativeSource(client, index_name, config), f"{transport} to a local service"


def _connect(url: str, token: str | None) -> tuple[Any, str]:
    from midx_client import RestSamplerClient, SamplerClient

    if url.startswith(("http://", "https://")):
        return RestSamplerClient(url, token=token, timeout_seconds=120.0), "REST"
    target = url.removeprefix("grpc://")
    return SamplerClient(target, token=token, timeout_seconds=120.0), "gRPC"


def _output_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    if args.no_write:
        return None, None
    if args.quick:
        return args.markdown, args.plot
    return args.markdown or DEFAULT_MARKDOWN, args.plot or DEFAULT_PLOT


def _command_line() -> str:
    arguments = sys.argv[2:] if sys.argv[1:2] == ["demo"] else []
    return " ".join(["midx-sampler demo", *arguments])
