"""prefixserve's Python client (sync and async): see :mod:`.http`."""
