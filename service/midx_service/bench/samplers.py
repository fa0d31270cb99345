"""Reference samplers that exist only to be measured against MIDX: two-stage multinomial and a floor."""

from __future__ import annotations

import math

import torch

from midx_service.core import MidxIndex


def two_stage_multinomial(index: MidxIndex, queries: torch.Tensor, num_samples: int, generator: torch.Generator):
    """Draw from the MIDX proposal the straightforward way: torch.multinomial for each stage.

    Returns (ids, log_q) of shape (B, M). Same distribution as MidxIndex.sample; this is the
    implementation a reader would write first, kept here only as a speed baseline.
    """
    cells = index.cells
    num_codewords = cells.num_codewords
    s1, s2 = index.codebooks.scores(queries)
    shift = s2.amax(dim=1, keepdim=True)
    exp_s2 = torch.exp(s2 - shift)
    first_logits = s1 + torch.log(exp_s2 @ cells.scaled_mass.T)
    log_z = torch.logsumexp(first_logits, dim=1, keepdim=True) + shift
    first = torch.multinomial(torch.softmax(first_logits, dim=1), num_samples, replacement=True, generator=generator)
    second_weights = cells.scaled_mass[first] * exp_s2.unsqueeze(1)
    second = torch.multinomial(second_weights.view(-1, num_codewords), 1, replacement=True, generator=generator)
    second = second.view_as(first)
    cell = first * num_codewords + second
    offset = (torch.rand(cell.shape, generator=generator) * cells.count[cell]).long()
    ids = cells.order[cells.start[cell] + offset]
    log_q = s1.gather(1, first) + s2.gather(1, second) - log_z - math.log(cells.mass_scale)
    return ids, log_q


class Floor:
    """The least work any sampler of this family does, as a lower bound on its time per batch.

    The codeword scores (two B x K x D products), one elementwise pass over the B x K x K cell masses
    into a preallocated buffer, and writing B x M random ids and floats.
    """

    def __init__(self, index: MidxIndex, batch: int) -> None:
        self.index = index
        num_codewords = index.cells.num_codewords
        self.buffer = torch.empty(batch, num_codewords, num_codewords)

    def __call__(self, queries: torch.Tensor, num_samples: int, generator: torch.Generator):
        s1, s2 = self.index.codebooks.scores(queries)
        torch.mul(self.index.cells.scaled_mass.unsqueeze(0), s2.unsqueeze(1), out=self.buffer)
        batch = queries.shape[0]
        ids = torch.randint(self.index.num_classes, (batch, num_samples), generator=generator)
        log_q = torch.rand(batch, num_samples, generator=generator)
        return ids, log_q, s1
