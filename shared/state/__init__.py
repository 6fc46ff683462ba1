"""Tabby's state on disk: the data-dir mirror (persist/hydrate), the snapshot store, SQLite copies, atomic writes,
locks and leases, archives and inspection. Plain paths and files; imports nothing above it."""
