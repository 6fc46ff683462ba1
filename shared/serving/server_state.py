"""The states of the server's lifecycle (shared/serving/server.py). A `StrEnum`: the values are what logs, pages
and tests read and compare (`server.state == "ready"`)."""

from __future__ import annotations

from enum import StrEnum


class ServerState(StrEnum):
    NEW = "new"
    MAINTENANCE = "maintenance"  # the maintenance lock is held: Tabby starts once it is gone
    HYDRATING = "hydrating"  # the data dir laid down as Tabby's local root
    STARTING = "starting"  # Tabby started, its port not answering yet
    READY = "ready"
    RESTARTING = "restarting"  # Tabby crashed: persist, then restart it with backoff
    FAILED = "failed"  # the start failed: `reason` says why
    GAVE_UP = "gave_up"  # more than the restart limit of crashes
    SUPERSEDED = "superseded"  # the data dir was replaced under the server: never persist over it
    STOPPING = "stopping"
    STOPPED = "stopped"
