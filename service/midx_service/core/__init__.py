"""The MIDX index core: pure torch, no I/O, runs on any torch device."""

from midx_service.core.config import SAMPLERS, IndexConfig, SampleResult
from midx_service.core.index import MidxIndex

__all__ = ["SAMPLERS", "IndexConfig", "MidxIndex", "SampleResult"]
