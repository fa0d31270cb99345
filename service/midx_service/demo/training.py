"""One training run of the main job: a next-word model under one sampler, with held-out evaluation."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from midx_client.loss import sampled_softmax_loss
from midx_service.data.corpus import Split
from midx_service.demo.model import NextWordModel, RowAdagrad
from midx_service.demo.sources import KlRefit, NegativeSource

logger = logging.getLogger(__name__)

# The samplers the main job compares, and the service's name for each sampled one. midx-rq keeps the
# k-means codebooks the index was built with; midx-rq-kl has them replaced by learned (KL) codebooks
# every `kl_refit_every` steps.
SAMPLERS: tuple[str, ...] = ("full", "uniform", "unigram", "midx-rq", "midx-rq-kl")
SERVICE_SAMPLERS = {"uniform": "uniform", "unigram": "unigram", "midx-rq": "midx", "midx-rq-kl": "midx"}
KL_REFIT_SAMPLERS = frozenset({"midx-rq-kl"})


@dataclass(frozen=True)
class TrainingConfig:
    """The budget and the hyperparameters, the same for every sampler of one run of the main job."""

    steps: int = 400
    batch_size: int = 128
    num_samples: int = 100
    context: int = 4
    hidden: int = 256
    learning_rate: float = 3e-3
    table_learning_rate: float = 0.2
    push_every: int = 5
    eval_every: int = 100
    eval_tokens: int = 1024
    kl_refit_every: int = 50
    seed: int = 0
    correct_positive: bool = True


@dataclass(frozen=True)
class CurvePoint:
    """Held-out perplexity after `step` steps and `seconds` of training (evaluation time excluded)."""

    step: int
    seconds: float
    perplexity: float


@dataclass(frozen=True)
class RefitPoint:
    """A learned refit the trainer requested after `step` steps, and its outcome."""

    step: int
    outcome: KlRefit


@dataclass
class RunResult:
    """Measurements of one sampler's run.

    seconds: training wall time, held-out evaluations excluded. service_seconds: the part of it spent
    waiting for sample, row-update and refit calls. setup_seconds: creating the index and uploading
    the table, not counted in `seconds`. seed: the seed of the data order, the starting model and the
    draws. refits: the learned refits of a midx-rq-kl run, whose waits count in `seconds`.
    """

    sampler: str
    steps: int
    seconds: float
    service_seconds: float
    setup_seconds: float
    seed: int = 0
    curve: list[CurvePoint] = field(default_factory=list)
    refits: list[RefitPoint] = field(default_factory=list)

    @property
    def refit_seconds(self) -> float:
        return sum(point.outcome.seconds for point in self.refits)

    @property
    def perplexity(self) -> float:
        return self.curve[-1].perplexity

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def service_share(self) -> float:
        return self.service_seconds / self.seconds if self.seconds > 0 else 0.0


class Batches:
    """A fixed schedule of training batches drawn with a seed, so every sampler trains on the same data."""

    def __init__(self, split: Split, context: int, batch_size: int, steps: int, seed: int) -> None:
        positions = split.target_positions(context)
        if positions.shape[0] == 0:
            raise ValueError(f"the training text has no position with {context} words of context")
        generator = np.random.default_rng(seed)
        self.positions = positions[generator.integers(0, positions.shape[0], size=(steps, batch_size))]
        self.tokens = torch.from_numpy(split.tokens)
        self.offsets = torch.arange(-context, 0)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (B, context) contexts and the (B,) next words of batch `step`."""
        targets = torch.from_numpy(self.positions[step])
        return self.tokens[targets.unsqueeze(1) + self.offsets], self.tokens[targets]


class Evaluator:
    """Full-softmax perplexity over all classes on a fixed sample of held-out positions."""

    def __init__(self, split: Split, context: int, num_tokens: int, seed: int, chunk_size: int = 256) -> None:
        positions = split.target_positions(context)
        if positions.shape[0] == 0:
            raise ValueError(f"the held-out text has no position with {context} words of context")
        generator = np.random.default_rng(seed)
        chosen = np.sort(generator.choice(positions.shape[0], min(num_tokens, positions.shape[0]), replace=False))
        tokens = torch.from_numpy(split.tokens)
        targets = torch.from_numpy(positions[chosen])
        self.contexts = tokens[targets.unsqueeze(1) + torch.arange(-context, 0)]
        self.targets = tokens[targets]
        self.chunk_size = chunk_size

    @property
    def num_tokens(self) -> int:
        return int(self.targets.shape[0])

    @torch.no_grad()
    def perplexity(self, model: NextWordModel, table: torch.Tensor) -> float:
        """Return exp of the mean cross-entropy of the full softmax over every row of `table`."""
        total = 0.0
        for start in range(0, self.num_tokens, self.chunk_size):
            contexts = self.contexts[start : start + self.chunk_size]
            targets = self.targets[start : start + self.chunk_size]
            logits = model(contexts) @ table.T
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
        return math.exp(total / self.num_tokens)


class Trainer:
    """Runs one sampler's training from the shared starting point and measures it."""

    def __init__(
        self,
        config: TrainingConfig,
        glove: np.ndarray,
        batches: Batches,
        evaluator: Evaluator,
        initial_perplexity: float,
    ) -> None:
        self.config = config
        self.glove = glove
        self.batches = batches
        self.evaluator = evaluator
        self.initial_perplexity = initial_perplexity

    def new_model(self) -> NextWordModel:
        """Return the starting model, identical for every sampler."""
        torch.manual_seed(self.config.seed)
        return NextWordModel(torch.from_numpy(self.glove), self.config.context, self.config.hidden)

    def run(self, sampler: str, source: NegativeSource | None = None, weights: np.ndarray | None = None) -> RunResult:
        """Train under `sampler` ("full", or a sampled one with its `source`) and evaluate along the way.

        weights: the (N,) class weights uploaded with the table, which the unigram sampler draws by.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if sampler != "full" and source is None:
            raise ValueError(f"sampler {sampler!r} needs a negative source")
        model = self.new_model()
        table = torch.from_numpy(self.glove.copy())
        state = _RunState(sampler, table, model, self.config)

        started = time.perf_counter()
        if source is not None:
            state.min_version = source.upload(self.glove, weights)
        setup_seconds = time.perf_counter() - started
        result = RunResult(sampler, self.config.steps, 0.0, 0.0, setup_seconds, seed=self.config.seed)
        result.curve.append(CurvePoint(0, 0.0, self.initial_perplexity))
        progress_every = max(1, self.config.steps // 10)

        for step in range(1, self.config.steps + 1):
            step_started = time.perf_counter()
            contexts, targets = self.batches.get(step - 1)
            if source is None:
                loss = state.full_softmax_step(contexts, targets)
            else:
                loss = state.sampled_step(source, SERVICE_SAMPLERS[sampler], contexts, targets)
                refit = (
                    sampler in KL_REFIT_SAMPLERS and step % self.config.kl_refit_every == 0 and step < self.config.steps
                )
                if refit or step % self.config.push_every == 0 or step == self.config.steps:
                    state.push_changed_rows(source)
                if refit:
                    result.refits.append(RefitPoint(step, state.refit_kl(source)))
                    self._log_refit(sampler, result.refits[-1])
            result.seconds += time.perf_counter() - step_started

            evaluate = step % self.config.eval_every == 0 or step == self.config.steps
            if evaluate:
                result.curve.append(CurvePoint(step, result.seconds, self.evaluator.perplexity(model, table)))
            if evaluate or step % progress_every == 0:
                self._log_progress(result, state, step, loss, evaluate)
        result.service_seconds = state.service_seconds
        return result

    def _log_refit(self, sampler: str, point: RefitPoint) -> None:
        outcome = point.outcome
        logger.info(
            "%s: step %d, learned refit %s in %.1f s, held-out KL %.3f -> %.3f",
            sampler,
            point.step,
            "accepted" if outcome.accepted else "rejected",
            outcome.seconds,
            outcome.heldout_kl_before,
            outcome.heldout_kl_after,
        )

    def _log_progress(self, result: RunResult, state: _RunState, step: int, loss: float, evaluated: bool) -> None:
        perplexity = f", held-out perplexity {result.perplexity:.1f}" if evaluated else ""
        logger.info(
            "%s: step %d/%d, loss %.3f%s, %.3f s/step, %.0f%% waiting on the service",
            result.sampler,
            step,
            self.config.steps,
            loss,
            perplexity,
            result.seconds / step,
            100.0 * state.service_seconds / result.seconds,
        )


class _RunState:
    """The model, the output table and their optimisers during one run."""

    def __init__(self, sampler: str, table: torch.Tensor, model: NextWordModel, config: TrainingConfig) -> None:
        self.sampler = sampler
        self.table = table
        self.model = model
        self.config = config
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.table_optimizer = RowAdagrad(table, config.table_learning_rate)
        self.changed: list[torch.Tensor] = []
        self.min_version = 0
        self.service_seconds = 0.0
        self.step = 0

    def full_softmax_step(self, contexts: torch.Tensor, targets: torch.Tensor) -> float:
        queries = self.model(contexts)
        batch = targets.shape[0]

        # The cross-entropy gradient written out (softmax minus one-hot) and computed in place in one
        # (B, N) buffer, in fewer passes over it than autograd's log-softmax, which keeps two more.
        with torch.no_grad():
            logits = queries.detach() @ self.table.T
            target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            gradient = logits.sub_(row_max).exp_()
            total = gradient.sum(dim=1, keepdim=True)
            loss = float((row_max + total.log()).squeeze(1).sub_(target_logits).mean())
            gradient /= total
            gradient[torch.arange(batch), targets] -= 1.0
            gradient /= batch
            query_gradient = gradient @ self.table
            table_gradient = gradient.T @ queries.detach()

        self.optimizer.zero_grad()
        queries.backward(query_gradient)
        self.optimizer.step()
        self.table_optimizer.step_dense(table_gradient)
        return loss

    def sampled_step(
        self, source: NegativeSource, service_sampler: str, contexts: torch.Tensor, targets: torch.Tensor
    ) -> float:
        self.step += 1
        queries = self.model(contexts)
        started = time.perf_counter()
        negatives = source.sample(
            service_sampler,
            queries.detach(),
            targets.unsqueeze(1),
            self.config.num_samples,
            min_version=self.min_version,
            seed=self.config.seed * 1_000_003 + self.step,
        )
        self.service_seconds += time.perf_counter() - started
        negative_ids = torch.as_tensor(negatives.ids)

        # Train on a leaf copy of the touched rows, so the backward pass costs nothing in N.
        batch, num_samples = negative_ids.shape
        touched, inverse = torch.unique(torch.cat([targets, negative_ids.flatten()]), return_inverse=True)
        rows = self.table[touched].requires_grad_(True)
        # index_select, not rows[inverse], because on the CPU the backward of advanced indexing sums
        # the gradients of repeated ids in a varying order, so runs of one seed would differ.
        positive_rows = rows.index_select(0, inverse[:batch])
        negative_rows = rows.index_select(0, inverse[batch:]).view(batch, num_samples, -1)
        loss = sampled_softmax_loss(
            queries, positive_rows, negative_rows, targets, negatives, correct_positive=self.config.correct_positive
        )

        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if rows.grad is not None:
            self.table_optimizer.step_rows(touched, rows.grad)
        self.changed.append(touched)
        return float(loss.detach())

    def push_changed_rows(self, source: NegativeSource) -> None:
        if not self.changed:
            return
        ids = torch.unique(torch.cat(self.changed))
        self.changed.clear()
        started = time.perf_counter()
        self.min_version = source.push_rows(ids.numpy(), self.table[ids].numpy())
        self.service_seconds += time.perf_counter() - started

    def refit_kl(self, source: NegativeSource) -> KlRefit:
        started = time.perf_counter()
        outcome = source.refit_kl()
        self.service_seconds += time.perf_counter() - started
        self.min_version = max(self.min_version, outcome.version)
        return outcome
