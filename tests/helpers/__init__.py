"""Helpers shared by the test modules, one module per kind of test.

- `child`: drive a real `damocles-ext child` process from a thread; throw-away plugin packages.
- `frontend`: tasks, configs and processes for the front-end tests (serve, run, prove, stress).
- `post`: sectors on disk for the PoSt tests.
- `postgres`: a throw-away PostgreSQL server (initdb, pg_ctl) for the job-store tests.
- `scheduling`: children whose requests end when the test says, and a recorder of what the
  supervisor started, for the scheduling tests.
- `supervisor`: child specs, fake children and process checks for the supervisor tests.

The fixtures built on them are in `tests/conftest.py`.
"""
