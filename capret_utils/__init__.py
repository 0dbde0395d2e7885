"""capret_utils — the shared package behind capret's notebooks, one package per stage of the flow.

``common`` (plumbing every stage shares) → ``data`` → ``captions`` → ``x2vlm`` (the model) → ``train`` →
``evaluation`` → ``viz`` → ``runs``. No import cycles (tests/test_imports.py); the data stage imports no later
stage except the model's image processor. See README "Layout" and "API by module".
"""

__version__ = "0.1.0"
