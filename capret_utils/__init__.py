"""capret_utils — the shared package behind capret's notebooks, one package per stage of the flow.

``common`` (plumbing every stage shares) → ``data`` → ``captions`` → ``x2vlm`` (the model) → ``train`` →
``evaluation`` → ``viz`` → ``runs``. No import cycles (tests/test_imports.py); the data stage imports no later
stage except the model's image processor. See README "Layout" and "API by module".
"""

import os as _os

# OpenMP threads that sleep while they wait instead of spinning: on a CPU shared with anything else (a DataLoader
# worker, a second job) torch's default spin made a demo training step 4x slower and a linear layer 10-20x slower
# (benchmarks/bench_threads.py). Read when torch loads libgomp, so this only applies when capret_utils is imported
# before torch; the Makefile exports it too. Set OMP_WAIT_POLICY=ACTIVE to keep spinning.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
