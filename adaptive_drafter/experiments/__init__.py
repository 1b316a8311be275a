"""Experiments off the library's floors: the benchmarks' shared helpers (`bench`) and the drift study's (`studies`).

The scripts under `scripts/` are thin launchers over these; the library (`adaptive_drafter.*` outside this package)
never imports them, so nothing here is on the path of a rollout or of training.
"""
