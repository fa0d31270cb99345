"""The two codebooks of an index: residual (rq) or product (pq) quantisation of the class table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midx_service.core.kmeans import ASSIGN_CHUNK_ROWS, assign, kmeans


@dataclass(frozen=True)
class Codebooks:
    """Two codebooks of K codewords each.

    For rq both are (K, D) and a class is approximated by first[a] + second[b]. For pq, `first`
    is (K, D1) over the first D1 = ceil(D / 2) coordinates and `second` is (K, D - D1) over the rest,
    and a class is approximated by the concatenation [first[a]; second[b]].
    """

    quantizer: str
    first: torch.Tensor
    second: torch.Tensor

    @property
    def num_codewords(self) -> int:
        return int(self.first.shape[0])

    def split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the parts of (B, D) vectors that the first and the second codebook score."""
        if self.quantizer == "rq":
            return vectors, vectors
        split_at = self.first.shape[1]
        return vectors[:, :split_at], vectors[:, split_at:]

    def scores(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (B, K) codeword scores s1 = z.C1 and s2 = z.C2 of (B, D) queries."""
        first_part, second_part = self.split(queries)
        return first_part @ self.first.T, second_part @ self.second.T

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        """Return the (N, 2) int64 codes (a, b) of the (N, D) rows, chunked over rows."""
        codes = torch.empty(table.shape[0], 2, dtype=torch.int64, device=table.device)
        for start in range(0, table.shape[0], ASSIGN_CHUNK_ROWS):
            chunk = table[start : start + ASSIGN_CHUNK_ROWS]
            first_part, second_part = self.split(chunk)
            first_codes = assign(first_part, self.first)
            if self.quantizer == "rq":
                second_part = second_part - self.first[first_codes]
            codes[start : start + chunk.shape[0], 0] = first_codes
            codes[start : start + chunk.shape[0], 1] = assign(second_part, self.second)
        return codes

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the (N, D) approximation of the rows with the given (N, 2) codes."""
        first = self.first[codes[:, 0]]
        second = self.second[codes[:, 1]]
        if self.quantizer == "rq":
            return first + second
        return torch.cat([first, second], dim=1)

    def to(self, device: torch.device) -> Codebooks:
        return Codebooks(self.quantizer, self.first.to(device), self.second.to(device))


def fit_codebooks(
    table: torch.Tensor,
    num_codewords: int,
    quantizer: str,
    *,
    generator: torch.Generator,
    iterations: int,
    max_points_per_codeword: int,
    init: Codebooks | None = None,
) -> Codebooks:
    """Fit both codebooks by k-means on a random sample of at most K * max_points_per_codeword rows."""
    sample = _training_sample(table, num_codewords * max_points_per_codeword, generator)
    if quantizer == "pq":
        split_at = (table.shape[1] + 1) // 2
        first_part, second_part = sample[:, :split_at], sample[:, split_at:]
    else:
        first_part = sample
    first = kmeans(
        first_part,
        num_codewords,
        iterations=iterations,
        generator=generator,
        init=None if init is None else init.first,
    )
    if quantizer == "rq":
        second_part = sample - first[assign(sample, first)]
    second = kmeans(
        second_part,
        num_codewords,
        iterations=iterations,
        generator=generator,
        init=None if init is None else init.second,
    )
    return Codebooks(quantizer, first, second)


def _training_sample(table: torch.Tensor, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    if table.shape[0] <= max_rows:
        return table
    rows = torch.randperm(table.shape[0], generator=generator, device=table.device)[:max_rows]
    return table[rows]
