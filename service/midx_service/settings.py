"""Server settings: one object read from MIDX_* environment variables, overridden by CLI flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from midx_service.core.learned import MIN_QUERIES

MIB = 1024 * 1024

_REDIS_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class InvalidSettingsError(ValueError):
    """A setting has an invalid value; the message names the setting and the value."""


class Settings(BaseSettings):
    """Every setting of `midx-sampler serve`; MIDX_<NAME> sets <name> (e.g. MIDX_HTTP_PORT)."""

    model_config = SettingsConfigDict(env_prefix="MIDX_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address both front ends listen on (0.0.0.0 for all)")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port (0 picks a free port)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free port)")
    device: str = Field("auto", description="torch device of the indexes: auto (cuda when present), cpu, cuda")
    redis_url: str | None = Field(None, description="Redis URL for persistence; unset keeps state in memory")
    redis_prefix: str = Field(
        "midx", description="prefix of every Redis key the server writes; servers with one prefix are replicas"
    )
    data_dir: Path | None = Field(
        None, description="directory for the mutation log and snapshots; unset keeps state in memory"
    )
    snapshot_interval_seconds: float = Field(
        300.0,
        ge=0.0,
        description="seconds between snapshots of changed indexes, which shorten recovery (0: only on refit and stop)",
    )
    snapshot_chunk_bytes: int = Field(
        64 * MIB, ge=4096, le=256 * MIB, description="largest chunk of a snapshot or mutation entry, in bytes"
    )
    api_token: SecretStr | None = Field(None, description="bearer token required on every non-health route")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain for gRPC TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key for gRPC TLS")
    max_message_bytes: int = Field(
        64 * MIB, ge=1024, description="largest gRPC message, in bytes (upload chunks are smaller)"
    )
    max_body_bytes: int = Field(
        512 * MIB, ge=1024, description="largest REST body and largest uploaded table, in bytes"
    )
    max_batch: int = Field(65536, ge=1, description="maximum queries in one sample or log-prob request")
    max_num_samples: int = Field(100_000, ge=1, description="largest num_samples per query")
    batch_window_ms: float = Field(
        2.0,
        ge=0.0,
        le=1000.0,
        description="how long a sample request waits to be batched with others (0: never)",
    )
    min_version_timeout_seconds: float = Field(
        10.0, gt=0.0, le=3600.0, description="how long a request waits for its min_version"
    )
    refit_error_ratio: float = Field(
        1.5,
        ge=0.0,
        description="refit when the quantisation error exceeds this multiple of the last fit's (0: never)",
    )
    refit_kl_ratio: float = Field(
        0.0,
        ge=0.0,
        description="refit when the measured KL(P || Q) exceeds this multiple of the KL measured after the last "
        "fit (0: never)",
    )
    auto_refit_mode: Literal["kmeans", "kl"] = Field(
        "kmeans", description="mode of the refits the two ratio policies start: kmeans or kl"
    )
    kl_refit_time_budget_seconds: float = Field(
        120.0,
        gt=0.0,
        le=86400.0,
        description="wall time of one kl refit, in seconds; its exact softmax passes over the queries count "
        "against it, and its final check may run past it",
    )
    kl_refit_max_queries: int = Field(
        1024, ge=MIN_QUERIES, le=1_000_000, description="most queries one kl refit learns from"
    )
    telemetry_reservoir_size: int = Field(
        4096,
        ge=0,
        le=1_000_000,
        description="recent query rows kept per index for telemetry and kl refits (0: none)",
    )
    telemetry_sample_size: int = Field(
        64,
        ge=0,
        le=1_000_000,
        description="most recent queries one telemetry measurement uses; each costs O(N D) (0: no KL)",
    )
    telemetry_interval_seconds: float = Field(
        60.0,
        ge=0.0,
        le=86400.0,
        description="time between telemetry measurements of every index, in seconds (0: only after fits)",
    )
    compute_threads: int = Field(4, ge=1, le=256, description="threads that run index builds and sampling")
    shutdown_grace_seconds: float = Field(
        5.0, ge=0.0, le=600.0, description="how long a graceful stop lets running requests finish"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{value!r} was requested but torch finds no CUDA device; use cpu or auto")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("refit_error_ratio", "refit_kl_ratio")
    @classmethod
    def _check_ratio(cls, value: float) -> float:
        if 0.0 < value <= 1.0:
            raise ValueError(f"must be 0 (never refit) or above 1, got {value}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://, e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _check_redis_prefix(cls, value: str) -> str:
        if not _REDIS_PREFIX.match(value):
            raise ValueError(f"must be 1 to 64 letters, digits, '.', '_', '-' or ':', got {value!r}")
        return value

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _check_path(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"{str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _check_one_store(self) -> Settings:
        if self.redis_url is not None and self.data_dir is not None:
            raise ValueError(
                "redis_url and data_dir are both set (MIDX_REDIS_URL, MIDX_DATA_DIR); set one: Redis keeps "
                "its own log and snapshots, the data directory is for servers without Redis"
            )
        return self

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "tls_cert_file and tls_key_file must be set together (MIDX_TLS_CERT_FILE, MIDX_TLS_KEY_FILE)"
            )
        return self

    @property
    def token(self) -> str | None:
        return None if self.api_token is None else self.api_token.get_secret_value() or None


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, with `overrides` (e.g. CLI flags) taking precedence.

    Raises InvalidSettingsError naming each invalid setting, its environment variable and the problem.
    """
    values = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**values)
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            name = ".".join(str(part) for part in problem["loc"]) or "settings"
            variable = f" (MIDX_{name.upper()})" if name in Settings.model_fields else ""
            problems.append(f"{name}{variable}: {problem['msg']}")
        raise InvalidSettingsError("invalid setting: " + "; ".join(problems)) from None
