"""X2-VLM in capret: config, model, official checkpoint loading, preprocessing, LoRA and memory estimates.

A re-implementation from Hugging Face ``transformers`` blocks (``BeitModel``, ``BertModel``, ``BertLayer``) that
loads the official X2-VLM checkpoints strictly and reproduces the official outputs (x2vlm.md). Entry points::

    model = X2VLMModel.from_official("x2vlm_base_1b.th", image_res=384)   # official file, strict
    model = X2VLMModel.from_pretrained("runs/.../model")                  # our own save_pretrained folder
    processor = X2VLMImageProcessor(ImageSettings(image_res=384))
    tokenizer = X2VLMTokenizer.from_pretrained("bert-base-uncased")

Submodules: ``config`` (X2VLMConfig, presets), ``modeling`` (X2VLMModel), ``convert`` (official checkpoints),
``processing`` (images, captions, tokenizer), ``lora`` (peft LoRA), ``memory`` (training memory estimate), ``vqa``
(X2VLMForVQA: answer decoder, ``rank_answer``, official VQA checkpoints).
"""

from capret_utils.x2vlm.config import (
    CLIP_MEAN,
    CLIP_STD,
    PRESETS,
    RANDOM_INIT_PRESETS,
    X2VLMConfig,
)
from capret_utils.x2vlm.convert import (
    LoadReport,
    OfficialCheckpointError,
    config_from_official,
    load_official_checkpoint,
    model_from_official,
    official_to_capret,
    read_official_checkpoint,
    resize_rel_pos_table,
    to_official_state_dict,
)
from capret_utils.x2vlm.lora import (
    LORA_TARGETS,
    LoraSettings,
    apply_lora,
    merge_lora,
    trainable_parameters,
)
from capret_utils.x2vlm.memory import (
    MemoryEstimate,
    StepPasses,
    estimate_training_memory,
    measure_saved_activations,
)
from capret_utils.x2vlm.modeling import (
    TEMP_MAX,
    TEMP_MIN,
    X2VLMModel,
    X2VLMOutput,
    register_auto_classes,
)
from capret_utils.x2vlm.vqa import (
    X2VLMForVQA,
    X2VLMVQAConfig,
    register_vqa_auto_classes,
    to_official_vqa_state_dict,
)
from capret_utils.x2vlm.processing import (
    BERT_SPECIAL_IDS,
    COMPACT_SPECIAL_IDS,
    ImageSettings,
    TextSettings,
    X2VLMImageProcessor,
    X2VLMTokenizer,
    build_wordpiece_tokenizer,
    check_tokenizer,
    fashion_caption_corpus,
    pre_caption,
)

register_auto_classes()
register_vqa_auto_classes()

__all__ = [
    "BERT_SPECIAL_IDS", "CLIP_MEAN", "RANDOM_INIT_PRESETS", "build_model", "CLIP_STD", "COMPACT_SPECIAL_IDS", "LORA_TARGETS", "PRESETS", "TEMP_MAX",
    "TEMP_MIN", "ImageSettings", "LoadReport", "LoraSettings", "MemoryEstimate", "OfficialCheckpointError", "StepPasses",
    "TextSettings", "X2VLMConfig", "X2VLMForVQA", "X2VLMImageProcessor", "X2VLMModel", "X2VLMOutput", "X2VLMTokenizer",
    "X2VLMVQAConfig", "register_vqa_auto_classes", "to_official_vqa_state_dict",
    "apply_lora", "build_wordpiece_tokenizer", "check_tokenizer", "config_from_official",
    "estimate_training_memory", "fashion_caption_corpus", "load_official_checkpoint", "measure_saved_activations",
    "merge_lora", "model_from_official", "official_to_capret", "pre_caption", "read_official_checkpoint",
    "register_auto_classes", "resize_rel_pos_table", "to_official_state_dict", "trainable_parameters",
]
