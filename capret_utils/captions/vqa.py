"""The VQA answerer: BLIP VQA or BLIP-2 answers each question about the item's crop or photo."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import (
    Any,
    Sequence,
)

from capret_utils.captions.dialogue import (
    ANSWER_INSTRUCTION,
    GenerationStats,
    Turn,
    clean_answer,
)
from capret_utils.captions.hf import _load_model
from capret_utils.captions.views import ItemView
from capret_utils.common import resolve_device

# ---------------------------------------------------------------------------------------------- VQA answerer

DEFAULT_VQA = "Salesforce/blip-vqa-base"


@dataclass
class VQAConfig:
    """How :class:`VQAAnswerer` loads and decodes."""

    device: str = "auto"
    dtype: str | None = None  # None = bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # BLIP-2 in NF4 (GPU)
    compute_dtype: str = "bfloat16"
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    context_rounds: int = 1  # BLIP-2: previous Q/A pairs in its prompt (ChatCaptioner's CLI default: 1)
    answer_instruction: str = ANSWER_INSTRUCTION  # BLIP-2 only; BLIP VQA sees the question alone
    revision: str | None = None


class VQAAnswerer:
    """A VQA model as the answerer, chosen by the checkpoint's ``config.model_type``.

    * ``blip`` → ``BlipForQuestionAnswering`` + ``BlipProcessor`` (e.g. ``Salesforce/blip-vqa-base``): terse
      1–3-word answers; only the question is input. In transformers 5.24 the answer decoder attends to the
      question's padding: ``BlipForQuestionAnswering.generate`` passes an all-ones question mask, and
      ``BlipTextAttention`` does not hand the cross-attention mask on to ``BlipTextSelfAttention`` (which reads
      ``encoder_attention_mask``). So padded batches would change answers. The answerer therefore runs the
      model's own parts (vision model → question encoder → ``text_decoder.generate``) with the real question mask
      and a forward pre-hook that passes the cross-attention mask on, as the original BLIP does; a probe at load
      time checks that a padded question gives the same logits as the unpadded one (``batching == "masked"``,
      one call per round). If the probe fails (another transformers version), questions are grouped by token
      length instead (``batching == "length-buckets"``: one call per distinct length, no padding).
    * ``blip-2`` → ``Blip2ForConditionalGeneration`` + ``Blip2Processor`` (e.g. ``Salesforce/blip2-opt-2.7b``):
      ChatCaptioner's prompt (instruction, the last ``context_rounds`` Q/A pairs, ``Question: q``, ``Answer:``),
      left-padded; a decoder-only (OPT) language model returns prompt + answer ids, so the prompt is sliced off.
    """

    SUPPORTED = ("blip", "blip-2")

    def __init__(self, model_id: str = DEFAULT_VQA, config: VQAConfig | None = None) -> None:
        from transformers import AutoConfig, AutoProcessor

        self.config = config or VQAConfig()
        self.model_id = str(model_id)
        self.name = f"vqa:{self.model_id}" + (" (4-bit)" if self.config.load_in_4bit else "")
        self.needs_images = True
        self.device = str(resolve_device(self.config.device))
        kw = {"revision": self.config.revision} if self.config.revision else {}
        model_type = AutoConfig.from_pretrained(self.model_id, **kw).model_type
        if model_type not in self.SUPPORTED:
            raise ValueError(f"{self.model_id}: config.json model_type {model_type!r} is not a supported VQA "
                             f"answerer; use one of {self.SUPPORTED} (BLIP VQA or BLIP-2)")
        self.kind = model_type
        self.processor = AutoProcessor.from_pretrained(self.model_id, **kw)
        if model_type == "blip":
            from transformers import BlipForQuestionAnswering as cls
        else:
            from transformers import Blip2ForConditionalGeneration as cls
        self.model = _load_model(cls, self.model_id, self.device, self.config.dtype, self.config.load_in_4bit,
                                 self.config.compute_dtype, self.config.revision)
        self.batching = "padded"
        if model_type == "blip-2":
            self.decoder_only = not getattr(self.model.config.text_config, "is_encoder_decoder", False)
            if self.decoder_only:
                self.processor.tokenizer.padding_side = "left"
        else:
            hooked = _pass_blip_cross_attention_mask(self.model.text_decoder)
            self.batching = "masked" if hooked and self._padding_is_masked() else "length-buckets"
        self.stats = GenerationStats()

    def _blip_encode(self, pixel_values: Any, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        image = self.model.vision_model(pixel_values=pixel_values)[0]
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=image, encoder_attention_mask=image_mask,
                                       return_dict=False)[0]

    def _padding_is_masked(self) -> bool:
        """Probe: do a question and the same question with 16 pad tokens give the same first-token logits?"""
        import torch
        from PIL import Image

        enc = self.processor(images=[Image.new("RGB", (64, 64), (120, 90, 60))], text=["what colour is it?"],
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.model.device), enc["attention_mask"].to(self.model.device)
        pad_id = self.processor.tokenizer.pad_token_id
        ids_p = torch.cat([ids, torch.full((1, 16), pad_id, dtype=ids.dtype, device=ids.device)], dim=1)
        mask_p = torch.cat([mask, torch.zeros((1, 16), dtype=mask.dtype, device=mask.device)], dim=1)
        pixels = enc["pixel_values"].to(self.model.device, self.model.dtype)
        bos = torch.full((1, 1), self.model.decoder_start_token_id, device=ids.device)
        with torch.inference_mode():
            logits = [self.model.text_decoder(input_ids=bos, encoder_hidden_states=self._blip_encode(pixels, i, m),
                                              encoder_attention_mask=m).logits.float()
                      for i, m in ((ids, mask), (ids_p, mask_p))]
        tol = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        return bool((logits[0] - logits[1]).abs().max() <= tol * max(1.0, float(logits[0].abs().max())))

    def _blip_generate(self, enc: dict[str, Any], gen: dict[str, Any]) -> Any:
        import torch

        question = self._blip_encode(enc["pixel_values"], enc["input_ids"], enc["attention_mask"])
        bos = torch.full((question.shape[0], 1), self.model.decoder_start_token_id, device=question.device)
        text_cfg = self.model.config.text_config
        return self.model.text_decoder.generate(input_ids=bos, eos_token_id=text_cfg.sep_token_id,
                                                pad_token_id=text_cfg.pad_token_id, encoder_hidden_states=question,
                                                encoder_attention_mask=enc["attention_mask"], **gen)

    def blip2_prompt(self, question: str, history: Sequence[Turn]) -> str:
        """ChatCaptioner's BLIP-2 prompt: instruction, the last ``context_rounds`` answered rounds, the question."""
        n = self.config.context_rounds
        answered = [t for t in history if t.question and t.answer and t.reason != "repeated question"]
        context = answered[-n:] if n > 0 else (answered if n < 0 else [])
        log = "".join(f"Question: {t.question}\nAnswer: {t.answer}\n" for t in context)
        return f"{self.config.answer_instruction}\n{log}Question: {question}\nAnswer:"

    def _generate(self, images: list[Any], texts: list[str]) -> list[str]:
        import torch

        cfg = self.config
        tok = self.processor.tokenizer
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        if self.kind == "blip":
            kwargs.update(truncation=True, max_length=self.model.config.text_config.max_position_embeddings)
        enc = self.processor(images=images, text=texts, **kwargs)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
        if cfg.min_new_tokens:
            gen["min_new_tokens"] = cfg.min_new_tokens
        started = time.perf_counter()
        with torch.inference_mode():
            out = self._blip_generate(enc, gen) if self.kind == "blip" else self.model.generate(**enc, **gen)
        if self.kind == "blip-2" and self.decoder_only and out.shape[1] >= enc["input_ids"].shape[1] and \
                bool((out[:, :enc["input_ids"].shape[1]] == enc["input_ids"]).all()):
            out = out[:, enc["input_ids"].shape[1]:]
        self.stats.add(GenerationStats(calls=1, sequences=len(texts),
                                       prompt_tokens=int(enc["attention_mask"].sum()),
                                       generated_tokens=int((out != tok.pad_token_id).sum()),
                                       seconds=time.perf_counter() - started))
        return [clean_answer(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def answer(self, views: Sequence[ItemView], questions: Sequence[str],
               histories: Sequence[Sequence[Turn]]) -> list[str]:
        if any(v.image is None for v in views):
            raise ValueError("VQAAnswerer needs item images; build the views with load_views(with_images=True)")
        images = [v.image for v in views]
        if self.kind == "blip-2":
            texts = [self.blip2_prompt(q, h) for q, h in zip(questions, histories, strict=True)]
            return self._generate(images, texts)
        if self.batching == "masked":
            return self._generate(images, list(questions))
        # BLIP without a working padding mask: one call per distinct question length (see the class docstring)
        lengths = [len(self.processor.tokenizer(q)["input_ids"]) for q in questions]
        answers: list[str] = [""] * len(questions)
        for length in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == length]
            answers_here = self._generate([images[i] for i in idx], [questions[i] for i in idx])
            for i, a in zip(idx, answers_here, strict=True):
                answers[i] = a
        return answers


def _pass_blip_cross_attention_mask(text_decoder: Any) -> bool:
    """Make BLIP's text decoder apply its cross-attention (question padding) mask; returns whether it hooked.

    ``BlipTextAttention`` calls ``BlipTextSelfAttention`` with ``attention_mask=<the cross mask>`` but the latter
    uses ``encoder_attention_mask`` for cross-attention, which arrives as None. The pre-hook copies one to the
    other for cross-attention calls only, and does nothing when the library already passes it.
    """

    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None \
                and kwargs.get("attention_mask") is not None:
            return args, {**kwargs, "encoder_attention_mask": kwargs["attention_mask"]}
        return None

    modules = [m for m in text_decoder.modules() if type(m).__name__ == "BlipTextSelfAttention"]
    for m in modules:
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return bool(modules)


