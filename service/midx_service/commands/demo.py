"""Run the main job: train a next-word model on real text with negatives from the service, per sampler."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midx_service.core import IndexConfig
from midx_service.demo.training import SAMPLERS, Batches, Evaluator, RunResult, Trainer, TrainingConfig

logger = logging.getLogger(__name__)

DEFAULT_MARKDOWN = Path("docs/benchmarks.md")
DEFAULT_PLOT = Path("docs/demo-perplexity.png")
INDEX_NAME_PREFIX = "demo-glove-"

# Budgets, sized so that all four samplers finish within the stated time on 2 CPU cores. The full
# softmax run takes most of it; docs/benchmarks.md has the measured times.
FULL_BUDGET = TrainingConfig(steps=400, batch_size=128, eval_every=100, eval_tokens=1024)
QUICK_BUDGET = TrainingConfig(steps=80, batch_size=128, eval_every=20, eval_tokens=512)


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
    budget.add_argument("--seed", type=int, default=None, help="seed of the data order, model and draws")
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
    from midx_service.data.corpus import load_corpus
    from midx_service.data.glove import MissingDataError, load_glove
    from midx_service.demo.report import RunContext, format_table, render_markdown, replace_section, write_plot

    try:
        config = _training_config(args)
        samplers = _samplers(args.samplers)
    except ValueError as error:
        print(f"midx-sampler demo: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    # Other processes on the machine slow every step down; the load average goes next to the times.
    load_average = os.getloadavg()[0]
    try:
        glove, _ = load_glove()
    except MissingDataError as error:
        print(f"midx-sampler demo: {error}", file=sys.stderr)
        return 1
    corpus = load_corpus()
    num_classes = args.num_classes or glove.shape[0]
    glove = np.ascontiguousarray(glove[:num_classes])
    train = corpus.train.restricted(num_classes)
    heldout = corpus.heldout.restricted(num_classes)

    batches = Batches(train, config.context, config.batch_size, config.steps, config.seed)
    evaluator = Evaluator(heldout, config.context, config.eval_tokens, config.seed + 1)
    trainer = Trainer(config, glove, batches, evaluator, initial_perplexity=float("nan"))
    trainer.initial_perplexity = evaluator.perplexity(trainer.new_model(), torch.from_numpy(glove))
    logger.info("held-out perplexity before training: %.0f", trainer.initial_perplexity)
    weights = _unigram_weights(args.unigram_weights, num_classes, train.tokens)
    index_config = IndexConfig(dim=glove.shape[1], num_codewords=args.num_codewords, last_stage=args.midx_last_stage)

    results: list[RunResult] = []
    try:
        with _negative_source(args, index_config) as (source, transport):
            for sampler in samplers:
                logger.info("training with %s (%d steps of %d words)", sampler, config.steps, config.batch_size)
                if sampler == "full":
                    results.append(trainer.run(sampler))
                    continue
                try:
                    results.append(trainer.run(sampler, source, _weights_for(sampler, weights, index_config)))
                finally:
                    source.close()
    except SamplerError as error:
        print(f"midx-sampler demo: a call to the service failed: {error}", file=sys.stderr)
        return 1

    context = RunContext(
        command=_command_line(),
        transport=transport,
        num_classes=num_classes,
        num_train_tokens=train.num_tokens,
        num_heldout_tokens=heldout.num_tokens,
        eval_tokens=evaluator.num_tokens,
        unigram_weights=_describe_weights(args.unigram_weights),
        midx_index=f"K = {args.num_codewords} residual quantisation with the {args.midx_last_stage} last stage",
        total_seconds=time.perf_counter() - started,
        machine=f"{os.cpu_count()} CPU cores ({platform.machine()}, 1-minute load average {load_average:.1f} "
        f"at the start), torch {torch.__version__}",
    )
    logger.info("main job finished in %.0f s", context.total_seconds)
    markdown_path, plot_path = _output_paths(args)
    if plot_path is not None:
        write_plot(results, plot_path)
        logger.info("wrote the plot to %s", plot_path)
    if markdown_path is not None:
        plot_name = None if plot_path is None else os.path.relpath(plot_path, markdown_path.parent)
        replace_section(markdown_path, render_markdown(results, config, context, trainer.initial_perplexity, plot_name))
        logger.info("wrote the results section of %s", markdown_path)

    if args.json:
        from midx_service.demo.report import results_json

        json.dump(results_json(results, config, context), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(results, trainer.initial_perplexity))
    return 0


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    config = QUICK_BUDGET if args.quick else FULL_BUDGET
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_samples": args.num_samples,
        "eval_every": args.eval_every,
        "eval_tokens": args.eval_tokens,
        "seed": args.seed,
    }
    config = replace(config, **{name: value for name, value in overrides.items() if value is not None})
    if args.uncorrected_positive:
        config = replace(config, correct_positive=False)
    for name in ("steps", "batch_size", "num_samples", "eval_every", "eval_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if args.num_classes is not None and args.num_classes < 2:
        raise ValueError(f"--num-classes must be at least 2, got {args.num_classes}")
    return config


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
    if sampler == "midx-rq" and config.last_stage == "popularity":
        return np.power(weights, config.unigram_alpha)
    return weights


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
        yield InProcessNegativeSource(config), "no service (in-process fallback)"
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
    with BackgroundServer(api_token=background_token) as server:
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
