"""Shared fixtures. Each fixture module lives in tests/fixtures/ and is registered here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's single-machine mode keeps every Ray listener on 127.0.0.1 (see server.app.pin_ray_to_loopback)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

pytest_plugins = [
    "tests.fixtures.backbones",
    "tests.fixtures.redis_server",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.deploy",
]
