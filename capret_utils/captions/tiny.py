"""Tiny random models for tests and smoke runs, built offline and saved with ``save_pretrained``.

Phi-3 / BLIP / BLIP-2 checkpoints with a few hundred thousand parameters, so tests and ``smoke=True`` notebook
runs load them through the same ``from_pretrained`` path as a user's hub id (``vqa="tiny"`` in notebook 02).
"""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path
from typing import (
    Any,
)

from capret_utils.captions.dialogue import (
    _OCCLUSION,
    _SCALE,
    _SLEEVES,
    _VIEW,
    _WORN,
    _ZOOM,
    ANSWER_INSTRUCTION,
    DEFAULT_QUESTIONS,
    FIRST_QUESTION,
    NEXT_QUESTION_INSTRUCTION,
    NO_ANSWER,
    QUESTION_INSTRUCTION,
    REPEATED_ANSWER,
    SUMMARY_INSTRUCTION,
)
from capret_utils.common import atomic_dir
from capret_utils.data.df2 import CATEGORY_NAMES

# ------------------------------------------------------------------------------------------ tiny test models

_TINY_SEED = 0
_TINY_MARKER = "tiny_models.json"
_PHI3_SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
_PHI3_CHAT_TEMPLATE = (  # mirrors Phi-3-mini-4k-instruct's current template (bos comes from the tokenizer)
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)



def _tiny_corpus() -> list[str]:
    words = ["navy", "white", "black", "red", "blue", "green", "grey", "beige", "pink", "yellow", "brown",
             "solid", "horizontal stripes", "vertical stripes", "polka dots", "checks", "cotton", "denim"]
    texts = [QUESTION_INSTRUCTION, NEXT_QUESTION_INSTRUCTION, SUMMARY_INSTRUCTION, ANSWER_INSTRUCTION,
             FIRST_QUESTION, REPEATED_ANSWER, NO_ANSWER, "Question: Answer: Summary:",
             *[q.text for q in DEFAULT_QUESTIONS], *CATEGORY_NAMES.values(), *words,
             *_SLEEVES_TEXT, *_VIEW_TEXT]
    return texts * 2


_SLEEVES_TEXT = [v for v in _SLEEVES.values() if v]
_VIEW_TEXT = [*[v for v in _VIEW.values() if v], *_WORN.values(), *_OCCLUSION.values(), *_SCALE.values(),
              *_ZOOM.values()]


def _tiny_bpe(specials: list[str], vocab_size: int) -> Any:
    """A deterministic SentencePiece-style (Metaspace) BPE trained offline on the module's own prompt text;
    printable-ASCII alphabet, so random models decode to readable gibberish."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n") + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer)
    return tok


def tiny_phi3_tokenizer() -> Any:
    """A Phi-3-style tokenizer built offline: bos ``<s>``, eos/pad ``<|endoftext|>``, ``<|user|>`` /
    ``<|assistant|>`` / ``<|end|>`` specials and a chat template mirroring Phi-3's; left padding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _tiny_bpe(_PHI3_SPECIALS, 900)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>", chat_template=_PHI3_CHAT_TEMPLATE,
                                   padding_side="left", model_max_length=4096)


PHI3_MINI_CONFIG: dict[str, Any] = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047, hidden_act="silu", tie_word_embeddings=False,
)
"""Phi-3-mini-4k-instruct's architecture (config.json): 3.82 B parameters, no GQA."""


def phi3_config(preset: str, tokenizer: Any) -> Any:
    """A ``Phi3Config``: ``"tiny"`` (hidden 64, 2 layers; ~0.2 M params) or ``"phi3-mini"`` (the real
    architecture, random weights), with the tokenizer's bos/pad and end tokens."""
    from transformers import Phi3Config

    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")]
    common = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=ends)
    if preset == "tiny":
        return Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                          original_max_position_embeddings=4096, initializer_range=0.2, **common)
    if preset == "phi3-mini":
        cfg = dict(PHI3_MINI_CONFIG)
        cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
        return Phi3Config(**cfg, **common)
    raise ValueError(f"unknown Phi-3 preset {preset!r}; use 'tiny' or 'phi3-mini'")


def _tiny_blip(out: Path) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for text in _tiny_corpus() for w in re.findall(r"[a-z]+|[^\sa-z]", text.lower())})
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words, "[DEC]", "[ENC]"]))}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    init = 0.5  # large enough that answers depend on the image and the question
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                         bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                         eos_token_id=vocab["[SEP]"], initializer_range=init),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=init),
        initializer_range=init)
    with torch.random.fork_rng():
        torch.manual_seed(_TINY_SEED)
        model = BlipForQuestionAnswering(config)
    model.save_pretrained(out)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(out)


def _tiny_blip2(out: Path) -> None:
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        PreTrainedTokenizerFast,
    )

    tok = _tiny_bpe(["<pad>", "</s>", "<unk>", "<image>"], 600)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    n_query, init = 4, 0.5
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=init),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, initializer_range=init),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, init_std=init),
        num_query_tokens=n_query, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=init)
    with torch.random.fork_rng():
        torch.manual_seed(_TINY_SEED)
        model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(out)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=n_query).save_pretrained(out)


def _tiny_phi3(out: Path) -> None:
    import torch
    from transformers import Phi3ForCausalLM

    tokenizer = tiny_phi3_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(_TINY_SEED)
        model = Phi3ForCausalLM(phi3_config("tiny", tokenizer))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_models(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Build (once) tiny random Phi-3, BLIP VQA and BLIP-2 (OPT) checkpoints with offline tokenizers under
    ``out_dir/{phi3,blip,blip2}`` via ``save_pretrained``; returns their folders. Deterministic (seed 0).

    Random weights produce gibberish — these exist to run the real loading, batching and generation code
    without a download (tests, smoke runs, the benchmark). Each model is written to a temporary folder and
    renamed into place, so an interrupted build is rebuilt next time.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, builder in (("phi3", _tiny_phi3), ("blip", _tiny_blip), ("blip2", _tiny_blip2)):
        target = out_dir / name
        if not (target / _TINY_MARKER).is_file():
            with atomic_dir(target) as tmp:
                builder(tmp)
                (tmp / _TINY_MARKER).write_text(json.dumps({"model": name, "seed": _TINY_SEED}) + "\n")
        result[name] = target
    return result
