"""WindowPoSt jobs for worker-prover mode: damocles' job record and rules (model.py, rules.py:
sans-IO) and the store that keeps them in SQLite or PostgreSQL (store.py)."""
