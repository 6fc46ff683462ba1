"""Every lock of the project, one module per mechanism, and the one wait loop the polling ones share.

- `store_lock`: the snapshot store's lock file (O_EXCL `lock.json` in the backups dir): one mutating run at a time.
- `lease`: leases in a modal.Dict (or `DirDict`, a local dir): the maintenance lock and the store lock across
  containers.
- `serve_lock`: the flock `serve --local DIR` holds on DIR for its whole life, and the orphan Tabby it may leave.
- `writer_lock`: the data dir's writer lock (a waited-for flock): persist, restore and reset one at a time.
- `holder`: who holds a lock (pid, host, process start time) and whether that process is gone.
- `waiting`: the wait loop of the store lock and the leases (poll with a deadline, say who we wait for, break a
  gone holder, give up naming it).
"""
