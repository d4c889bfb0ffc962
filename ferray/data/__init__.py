"""Data in and out: the shard schema, storage (URI -> fs, trees, sinks, markers), image checks, dataset readers, ingest."""
