"""Shared fixtures. Each fixture module lives in tests/fixtures/ and is registered here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.backbones",
    "tests.fixtures.redis_server",
    "tests.fixtures.ray_cluster",
]
