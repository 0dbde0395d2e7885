"""X2-VLM VQA (x2vlm.md §7): the answer decoder, ``rank_answer`` over a fixed answer list, official loading.

The official ``models/model_generation.py::XVLMForVQA``:

* the question is encoded by the text-only layers and the fusion layers cross-attending to the image
  (``question_states`` = the fusion output, (B, L, text width));
* a ``text_decoder`` (HF ``BertLMHeadModel``: ``text_decoder.bert.*`` + LM head ``text_decoder.cls.*``) of
  ``num_dec_layers`` causal layers, every one cross-attending to the question states (keys/values at the text
  width), generates the answer ``[CLS] answer [SEP]``; training loss = per-answer summed token NLL × weight,
  summed and divided by the batch size (no label smoothing: ``BertLMHeadModel(label_smoothing=0.0)``);
* ``rank_answer``: the top-``k`` candidates by the probability of their first token after ``[CLS]``, each
  re-scored as ``log p(first token) - LM loss of the whole candidate``. The LM loss already contains the first
  token, so the official score counts ``log p(first token)`` twice; we keep that (it is what the released
  numbers were computed with) and :func:`candidate_scores` documents the formula;
* initialisation from a pre-trained / retrieval model: decoder layer ``j`` = fusion layer ``j`` (or fusion layer
  ``2j + 1``, counted in the full stack's parity, when ``num_dec_layers`` is half the fusion depth), decoder
  embeddings = text embeddings, LM head = MLM head; decoder cross-attention keys/values are copied only when
  the vision and text widths agree (otherwise they start fresh). No ITC / ITM / box heads.

State-dict names (ours = official except the encoder parts, which follow :mod:`capret_utils.x2vlm.convert`):
``vision_encoder.*``, ``text_encoder.*``, ``fusion.{j}.*``, ``text_decoder.bert.*``, ``text_decoder.cls.*``.
:meth:`X2VLMForVQA.from_official` loads an official ``XVLMForVQA`` file key-exactly (missing, unexpected and
mis-shaped keys are an :class:`~capret_utils.x2vlm.convert.OfficialCheckpointError` naming them);
:meth:`X2VLMForVQA.from_x2vlm` applies the official initialisation to one of our X2-VLM models and returns a
:class:`VQAInitReport` listing what was copied, what starts fresh and what was left out.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertLMHeadModel, PreTrainedModel

from capret_utils.x2vlm.config import X2VLMConfig
from capret_utils.x2vlm.convert import (
    OfficialCheckpointError,
    config_from_official,
    official_to_capret,
    read_official_checkpoint,
    to_official_state_dict,
)
from capret_utils.x2vlm.modeling import X2VLMModel

DEC = "text_decoder."
_NOT_IN_VQA = ("vision_proj", "text_proj", "temp", "itm_head", "bbox_head", "mlm_head")


class X2VLMVQAConfig(X2VLMConfig):
    """An X2-VLM architecture plus the answer decoder (``num_dec_layers``) and the ranking depth (``k_test``)."""

    model_type = "x2vlm-vqa"

    num_dec_layers: int = 0  # decoder layers; 0 = as many as fusion layers (official: fusion depth or half of it)
    k_test: int = 128  # candidates kept by first-token probability before full-sequence re-ranking (official 128)

    def __post_init__(self, **kwargs: Any) -> None:
        # a VQA model has no ITC projection, ITM, box or MLM head (its LM head is the decoder's)
        self.has_itm_head = self.has_bbox_head = self.has_mlm_head = False
        super().__post_init__(**kwargs)
        if not self.num_dec_layers:
            self.num_dec_layers = self.fusion_layers
        if self.num_dec_layers < 1:
            raise ValueError(f"X2VLMVQAConfig: num_dec_layers must be >= 1, got {self.num_dec_layers}")
        if self.k_test < 1:
            raise ValueError(f"X2VLMVQAConfig: k_test must be >= 1, got {self.k_test}")

    @classmethod
    def from_x2vlm(cls, config: X2VLMConfig, **overrides: Any) -> "X2VLMVQAConfig":
        """The VQA config of an X2-VLM architecture (same encoder numbers)."""
        values = {k: v for k, v in config.to_dict().items()
                  if k in X2VLMConfig.__annotations__ or k in ("pad_token_id",)}
        values.update(overrides)
        return cls(**values)

    def decoder_config(self):
        """``BertConfig`` of the decoder: the fusion layers' sizes, causal, cross-attention at the text width."""
        bert = self.bert_config(fusion=True)
        bert.num_hidden_layers = self.num_dec_layers
        bert.tie_word_embeddings = True  # official BertLMHeadModel ties the LM decoder to its word embeddings
        return bert


@dataclass
class VQAInitReport:
    """What :meth:`X2VLMForVQA.from_x2vlm` did (names are ours)."""

    copied: dict[str, str] = field(default_factory=dict)  # VQA key -> source key
    fresh: list[str] = field(default_factory=list)  # VQA keys left at their random initialisation
    left_out: list[str] = field(default_factory=list)  # source keys the VQA model has no place for

    def summary(self) -> str:
        return (f"{len(self.copied)} tensors copied, {len(self.fresh)} fresh ({_prefixes(self.fresh)}), "
                f"{len(self.left_out)} source tensors left out ({_prefixes(self.left_out)})")


def _prefixes(keys: list[str]) -> str:
    return ", ".join(sorted({re.sub(r"\.\d+\..*|\.(weight|bias)$", "", k) for k in keys})) or "none"


class X2VLMForVQA(X2VLMModel):
    """X2-VLM VQA: encoder (vision + text + fusion) and the answer decoder; ranks a fixed answer list."""

    config_class = X2VLMVQAConfig
    config: X2VLMVQAConfig

    def __init__(self, config: X2VLMVQAConfig) -> None:
        super().__init__(config)
        for name in ("vision_proj", "text_proj", "temp"):
            delattr(self, name)
        self.text_decoder = BertLMHeadModel(config.decoder_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        PreTrainedModel._init_weights(self, module)  # X2VLMModel's also sets temp, which VQA does not have

    def get_image_feat(self, image_embeds: torch.Tensor) -> None:
        """No ITC projection in the VQA model: :meth:`get_image_embeds` returns ``(image_embeds, None)``."""
        return None

    # ------------------------------------------------------------------ passes
    def question_states(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Question tokens through the text-only and fusion layers, cross-attending to the image: (B, L, Dt)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds, _ = self.get_image_embeds(pixel_values)
        text = self.get_text_embeds(input_ids, attention_mask)
        return self.get_fusion_embeds(text, attention_mask, image_embeds)

    def answer_nll(self, question_states: torch.Tensor, question_atts: torch.Tensor, answer_ids: torch.Tensor,
                   answer_atts: torch.Tensor) -> torch.Tensor:
        """Per answer, the summed negative log-likelihood of its tokens after the first (``[CLS]``) one, padding
        (``pad_token_id``) excluded: the official ``BertLMHeadModel`` loss with ``reduction='none'``. (N,)."""
        logits = self.text_decoder(input_ids=answer_ids, attention_mask=answer_atts,
                                   encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_atts).logits
        targets = answer_ids[:, 1:].masked_fill(answer_ids[:, 1:] == self.config.pad_token_id, -100)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=-100, reduction="none")
        return nll.view(answer_ids.shape[0], -1).sum(1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor,
                answers_per_question: torch.Tensor | None = None,
                answer_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: ``sum(weight × answer NLL) / batch size``; question ``b`` has ``answers_per_question[b]``
        consecutive answers (default one each) with ``answer_weights`` (default 1)."""
        states = self.question_states(pixel_values, input_ids, attention_mask)
        b = states.shape[0]
        if answers_per_question is None:
            answers_per_question = torch.ones(b, dtype=torch.long, device=states.device)
        if int(answers_per_question.sum()) != answer_ids.shape[0]:
            raise ValueError(f"answers_per_question sums to {int(answers_per_question.sum())} but "
                             f"{answer_ids.shape[0]} answers were given")
        states = states.repeat_interleave(answers_per_question, 0)
        atts = attention_mask.repeat_interleave(answers_per_question, 0)
        nll = self.answer_nll(states, atts, answer_ids, answer_attention_mask)
        if answer_weights is not None:
            nll = nll * answer_weights
        return nll.sum() / b

    def first_token_probs(self, question_states: torch.Tensor, question_atts: torch.Tensor,
                          answer_ids: torch.Tensor) -> torch.Tensor:
        """p(first answer token | [CLS], question) of every candidate: (Q, A)."""
        start = answer_ids[0, 0].repeat(question_states.shape[0], 1)
        logits = self.text_decoder(input_ids=start, encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_atts).logits[:, 0, :]
        return F.softmax(logits.float(), dim=1).index_select(1, answer_ids[:, 1])

    @torch.no_grad()
    def rank_answer(self, question_states: torch.Tensor, question_atts: torch.Tensor, answer_ids: torch.Tensor,
                    answer_atts: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ranking: ``(topk_ids, topk_probs)``, each (Q, k), best first; ids index the answer list.

        ``k`` defaults to ``config.k_test`` and is capped at the number of candidates.
        """
        k = min(int(k or self.config.k_test), answer_ids.shape[0])
        if len({int(i) for i in answer_ids[:, 0]}) != 1:
            raise ValueError("every candidate answer must start with the same bos token ([CLS])")
        first = self.first_token_probs(question_states, question_atts, answer_ids)
        topk_probs, topk_ids = first.topk(k, dim=1)
        flat = topk_ids.reshape(-1)
        ids, atts = answer_ids.index_select(0, flat), answer_atts.index_select(0, flat)
        width = int(atts.sum(1).max())  # columns that are padding for every shortlisted answer change nothing
        nll = self.answer_nll(question_states.repeat_interleave(k, 0), question_atts.repeat_interleave(k, 0),
                              ids[:, :width], atts[:, :width])
        scores = (topk_probs.reshape(-1).log() - nll).view(-1, k)
        probs, rerank = F.softmax(scores, dim=-1).topk(k, dim=1)
        return torch.gather(topk_ids, 1, rerank), probs

    # ------------------------------------------------------------------ initialisation and loading
    @classmethod
    def from_x2vlm(cls, model: X2VLMModel, num_dec_layers: int = 0, k_test: int = 128,
                   ) -> tuple["X2VLMForVQA", VQAInitReport]:
        """A VQA model initialised from an X2-VLM model as the official ``XVLMForVQA.load_pretrained`` does."""
        src_cfg = model.config
        config = X2VLMVQAConfig.from_x2vlm(src_cfg, num_dec_layers=num_dec_layers, k_test=k_test)
        n_fusion, n_dec = src_cfg.fusion_layers, config.num_dec_layers
        if n_dec == n_fusion:
            layer_of = {j: j for j in range(n_dec)}
        elif n_dec == n_fusion // 2:  # official: drop layers with an even index in the whole text stack
            kept = [f for f in range(n_fusion) if (src_cfg.text_layers + f) % 2 == 1]
            layer_of = {j: f for j, f in enumerate(kept)}
        else:
            raise ValueError(f"num_dec_layers={n_dec}: the official initialisation supports {n_fusion} or "
                             f"{n_fusion // 2} decoder layers (the fusion depth or half of it)")
        vqa = cls(config)
        src = model.state_dict()
        target = vqa.state_dict()
        report = VQAInitReport()
        same_width = src_cfg.vision_width == src_cfg.text_width
        for key in target:
            source = None
            if not key.startswith(DEC):
                source = key
            elif key.startswith(DEC + "bert.embeddings."):
                source = "text_encoder." + key[len(DEC + "bert."):]
            elif m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.(.+)$", key):
                rest = m.group(2)
                if same_width or not re.match(r"crossattention\.self\.(key|value)\.", rest):
                    source = f"fusion.{layer_of[int(m.group(1))]}.{rest}"
            elif key.startswith(DEC + "cls."):
                source = "mlm_head." + key[len(DEC + "cls."):]
            if source is not None and source in src and src[source].shape == target[key].shape:
                report.copied[key] = source
            else:
                report.fresh.append(key)
        used = set(report.copied.values())
        report.left_out = sorted(k for k in src if k not in used and k.split(".")[0] in _NOT_IN_VQA)
        unplaced = sorted(k for k in src if k not in used and k not in report.left_out)
        if unplaced:
            raise ValueError(f"from_x2vlm: source tensors with no place in the VQA model: {unplaced}")
        with torch.no_grad():
            vqa.load_state_dict({**target, **{k: src[s] for k, s in report.copied.items()}}, strict=True)
        vqa.tie_weights()
        vqa.init_report = report
        return vqa, report

    @classmethod
    def from_official(cls, path: str | os.PathLike | Mapping[str, Any], text_num_attention_heads: int | None = None,
                      image_res: int | None = None, trust_checkpoint: bool = False, k_test: int = 128,
                      ) -> "X2VLMForVQA":
        """Load an official ``XVLMForVQA`` checkpoint key-exactly (``text_decoder.*`` + the retrieval naming of
        the encoder). Every missing, unexpected or mis-shaped key raises :class:`OfficialCheckpointError`."""
        state, ckpt_config, source = read_official_checkpoint(path, trust_checkpoint)
        dec = {k: v for k, v in state.items() if k.startswith(DEC)}
        enc = {k: v for k, v in state.items() if not k.startswith(DEC)}
        if not dec:
            raise OfficialCheckpointError(f"{source}: no text_decoder.* keys: not an official XVLMForVQA "
                                          f"checkpoint (load retrieval / pre-training files with X2VLMModel, then "
                                          f"X2VLMForVQA.from_x2vlm)")
        pos = dec.pop(DEC + "bert.embeddings.position_ids", None)
        if pos is not None and not pos.is_meta and not torch.equal(pos.reshape(-1).long(),
                                                                   torch.arange(pos.numel())):
            raise OfficialCheckpointError(f"{source}: text_decoder.bert.embeddings.position_ids is not 0..n-1")
        layers = sorted({int(m.group(1)) for k in dec if (m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.", k))})
        if layers != list(range(len(layers))) or not layers:
            raise OfficialCheckpointError(f"{source}: decoder layers are not numbered 0..n-1: {layers}")
        base = config_from_official(enc, ckpt_config, text_num_attention_heads=text_num_attention_heads,
                                    image_res=image_res, source=source)
        config = X2VLMVQAConfig.from_x2vlm(base, num_dec_layers=len(layers), k_test=k_test)
        mapped, report = official_to_capret(enc, config, source=source, strict=False)
        model = cls(config)
        expected = model.state_dict()
        mapped.update(dec)
        tied = dict(model.all_tied_weights_keys)
        problems = []
        if report.unmapped:
            problems.append(f"checkpoint keys with no place in the model: {report.unmapped}")
        unexpected = sorted(k for k in mapped if k not in expected)
        missing = sorted(k for k in expected if k not in mapped and k not in tied)
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                      for k, v in mapped.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint keys the VQA model does not have: {unexpected}")
        if missing:
            problems.append(f"{len(missing)} model keys missing from the checkpoint: {missing}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {mismatched}")
        for copy, orig in tied.items():
            if copy in mapped and orig in mapped and not mapped[copy].is_meta and \
                    not torch.equal(mapped[copy], mapped[orig]):
                problems.append(f"{copy} is not tied to {orig}")
        if problems:
            raise OfficialCheckpointError(f"{source}: strict VQA load failed: " + "; ".join(problems))
        for copy, orig in tied.items():
            mapped.setdefault(copy, mapped[orig])
        model.load_state_dict(mapped, strict=True)
        model.tie_weights()
        report.recomputed.append(DEC + "bert.embeddings.position_ids")
        model.official_load_report = report
        return model


def to_official_vqa_state_dict(model: X2VLMForVQA) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :meth:`X2VLMForVQA.from_official`: the official ``XVLMForVQA`` state dict (retrieval naming of
    the encoder, fused vision qkv, recomputed buffers, tied decoder copies)."""
    sd = model.state_dict()
    enc = OrderedDict((k, v) for k, v in sd.items() if not k.startswith(DEC))
    out = to_official_state_dict(enc, model.config, naming="retrieval")
    out[DEC + "bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings).unsqueeze(0)
    for k, v in sd.items():
        if k.startswith(DEC):
            out[k] = v
    return out


def candidate_scores(model: X2VLMForVQA, question_states: torch.Tensor, question_atts: torch.Tensor,
                     answer_ids: torch.Tensor, answer_atts: torch.Tensor) -> torch.Tensor:
    """Every candidate's official ranking score without the top-k cut, (Q, A): ``log p(first token) - NLL(answer)``
    (``log p(first token)`` counted twice, as in the official ``rank_answer``). Costs Q × A decoder passes."""
    q, a = question_states.shape[0], answer_ids.shape[0]
    first = model.first_token_probs(question_states, question_atts, answer_ids)
    nll = model.answer_nll(question_states.repeat_interleave(a, 0), question_atts.repeat_interleave(a, 0),
                           answer_ids.repeat(q, 1), answer_atts.repeat(q, 1)).view(q, a)
    return first.log() - nll


def register_vqa_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel`` load saved VQA folders (``model_type`` "x2vlm-vqa")."""
    AutoConfig.register(X2VLMVQAConfig.model_type, X2VLMVQAConfig, exist_ok=True)
    AutoModel.register(X2VLMVQAConfig, X2VLMForVQA, exist_ok=True)
