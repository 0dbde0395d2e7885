"""capret_utils — the shared package behind capret's notebooks, one package per stage of the flow.

``common`` (plumbing every stage shares) → ``data`` → ``captions`` → ``x2vlm`` (the model) → ``train`` →
``evaluation`` → ``viz`` → ``runs``. A stage imports only from stages before it; ``testing`` holds the tiny
random models that tests and smoke runs load. See README "Layout and API".
"""

__version__ = "0.1.0"
