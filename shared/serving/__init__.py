"""Tabby while it serves: the supervisor of `tabby serve`, the ASGI proxy and owner guard in front of it, the
runtime that ties them to the state (hydrate, persist), and the local ASGI host. Uses `shared.state` only."""
