"""Stage 3b, encoders: the peer encoders a user would pick instead of X2-VLM, behind one interface.

Owns the :class:`~capret_utils.encoders.base.Encoder` interface (image batch -> L2-normalised float32 vectors; text
-> vectors where a text tower exists; ``name``, ``family``, ``has_text``, ``image_size``), the loaders
(:mod:`.hf`: transformers CLIP / SigLIP / SigLIP 2 / DINOv2 by hub id or folder; :mod:`.openclip`: open_clip
``hf-hub:`` ids or folders, needs torchvision), the registry of published ids with licences and sizes
(:mod:`.registry`), tiny random checkpoints of each family for tests and the demo (:mod:`.tiny`) and the adapter
that puts an X2-VLM model bundle behind the same interface (:mod:`.adapter`). Evaluation of encoders lives in
:mod:`capret_utils.evaluation.peers`, LoRA fine-tuning in :mod:`capret_utils.train.peers`.
"""

from capret_utils.encoders.adapter import X2VLMEncoder  # noqa: F401
from capret_utils.encoders.base import WEIGHTS, Encoder  # noqa: F401
from capret_utils.encoders.hf import HFEncoder, load_hf  # noqa: F401
from capret_utils.encoders.openclip import (  # noqa: F401
    TINY_OPEN_CLIP,
    OpenCLIPEncoder,
    build_tiny_open_clip,
    load_open_clip,
    require_open_clip,
    save_open_clip,
)
from capret_utils.encoders.registry import (  # noqa: F401
    KNOWN,
    KnownEncoder,
    known_table,
    load_encoder,
    parse_encoders,
    row_label,
)
from capret_utils.encoders.tiny import TINY_FAMILIES, build_tiny_encoder, build_tiny_encoders  # noqa: F401
