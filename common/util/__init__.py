"""Small primitives every layer uses: files, strict JSON, clocks, digests, progress, watchdogs."""
