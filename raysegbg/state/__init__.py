"""Shared state of a run: dataset-level feature memories and the pseudo-label store.

`memory` and `store` are plain torch / numpy (every rank holds the memories, updated
identically inside the step); `actor` hosts the run's copy on Ray for eval, restore and
cross-run readers; `client` is what workers use to reach it without blocking the step.
"""
