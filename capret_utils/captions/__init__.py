"""Captions per garment item: template captions, ChatCaptioner-style dialogue captions, the resumable store.

This module owns everything that turns an items-table row into a caption:

* :func:`template_caption` — the original study's format, literally
  ``"An image of a {category_name} with viewpoint {v}, occlusion level {o}, scale {s}, and zoom in {z}"``.
* The dialogue (ChatCaptioner, Zhu et al. 2023): a fixed first question, then ``rounds - 1`` questions from a
  **questioner** that sees only the history, each answered by an **answerer** that sees the item (crop or whole
  image), then one summary. Answers that carry no information (no / not sure / don't know / empty) and repeated
  questions are filtered *in code* and kept out of the summary. All items of a batch advance in **lockstep**:
  one left-padded batched LLM call and one batched VQA call per round, one batched summary call.

  Questioners (:class:`Questioner` protocol): :class:`ChatLLMQuestioner` (any HF chat causal LM through its chat
  template, default Phi-3-mini, optional 4-bit NF4, the KV cache of the shared dialogue prefix reused across
  rounds), :class:`ScriptedQuestioner` (fixed question list + rule-based summary; the offline questioner).
  Answerers (:class:`Answerer` protocol): :class:`VQAAnswerer` (BLIP VQA or BLIP-2, chosen by the checkpoint's
  config), :class:`AttributeAnswerer` (ground truth from the items table + ``attributes.jsonl``; the offline
  answerer and a ceiling for a perfect VQA).
* :class:`CaptionStore` — ``captions.jsonl``, one JSON object per item, appended and fsync'ed per batch; a
  restarted run skips finished keys; a torn last line (a run killed mid-write) is reported by readers and cut
  off before appending. :func:`load_captions` is what fine-tuning and retrieval call.
* :func:`capret_utils.captions.tiny.build_tiny_models` — tiny random Phi-3 / BLIP / BLIP-2 checkpoints built offline from configs and saved
  with ``save_pretrained``, so tests and smoke runs load them through the same ``from_pretrained`` path as a
  user's model id.

torch / transformers are imported lazily: template captions, the store and the scripted/attribute pair need
neither.

Submodules: ``template``, ``dialogue`` (protocols, scripted questioner, attribute answerer, captioners),
``views``, ``hf`` (loading, 4-bit), ``tiny`` (tiny random models for tests and smoke runs), ``llm`` (LLM questioner), ``vqa`` (VQA answerer), ``store``, ``runner``
(run_captioning, notebook 02 setup, reports), ``pixel`` (the pixel answerer: X2-VLM VQA trained on the train split),
``answer_quality`` (answers vs ground truth per topic). Their public names are re-exported here.
"""

from capret_utils.captions.answer_quality import (  # noqa: F401
    AnswerQuality,
    PriorAnswerer,
    answer_accuracy,
    evaluate_answerer,
)
from capret_utils.captions.dialogue import (  # noqa: F401
    ANSWER_INSTRUCTION,
    ATTRIBUTES_FILE,
    DEFAULT_QUESTIONS,
    FIRST_QUESTION,
    NEXT_QUESTION_INSTRUCTION,
    NO_ANSWER,
    QUESTION_INSTRUCTION,
    REPEATED_ANSWER,
    SUMMARY_INSTRUCTION,
    Answerer,
    AttributeAnswerer,
    DialogueCaptioner,
    DialogueConfig,
    GenerationStats,
    Questioner,
    ScriptedQuestion,
    ScriptedQuestioner,
    TemplateCaptioner,
    Turn,
    clean_answer,
    clean_question,
    clean_summary,
    load_attributes,
    question_topic,
    same_question,
    uninformative_reason,
)
from capret_utils.captions.hf import (  # noqa: F401
    quantization_config,
)
from capret_utils.captions.llm import (  # noqa: F401
    DEFAULT_LLM,
    ChatLLMQuestioner,
    LLMConfig,
)
from capret_utils.captions.pixel import (  # noqa: F401
    PIXEL_VQA,
    PixelAnswerer,
    PixelVQAConfig,
    load_or_train,
    vqa_triples,
)
from capret_utils.captions.runner import (  # noqa: F401
    SPLITS,
    CaptionSetup,
    RunStats,
    build_captioner,
    caption_lengths,
    caption_metrics,
    format_dialogue,
    load_split_items,
    resolve_splits,
    run_captioning,
    select_items,
    side_by_side,
)
from capret_utils.captions.store import (  # noqa: F401
    CAPTIONS_FILE,
    CaptionStore,
    StoreReport,
    dialogue_source,
    load_captions,
    load_dialogue_captions,
    merged_records,
    read_captions,
    shard_path,
    store_shards,
)
from capret_utils.captions.template import (  # noqa: F401
    OCCLUSION_WORDS,
    SCALE_WORDS,
    TEMPLATE,
    VIEWPOINT_WORDS,
    ZOOM_WORDS,
    item_texts,
    template_caption,
    template_captions,
)
from capret_utils.captions.views import (  # noqa: F401
    ItemView,
    load_views,
)
from capret_utils.captions.vqa import (  # noqa: F401
    DEFAULT_VQA,
    VQAAnswerer,
    VQAConfig,
)
