"""The LLM questioner: any Hugging Face chat causal LM (default Phi-3-mini, optional 4-bit) asks the next question."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import (
    Any,
    Sequence,
)

from capret_utils.captions.dialogue import (
    NEXT_QUESTION_INSTRUCTION,
    NO_ANSWER,
    QUESTION_INSTRUCTION,
    REPEATED_ANSWER,
    SUMMARY_INSTRUCTION,
    GenerationStats,
    Turn,
    clean_question,
    clean_summary,
)
from capret_utils.captions.hf import _generated_lengths, _load_model
from capret_utils.common import resolve_device

# ---------------------------------------------------------------------------------------- LLM questioner

DEFAULT_LLM = "microsoft/Phi-3-mini-4k-instruct"


@dataclass
class _PrefixState:
    """What :class:`ChatLLMQuestioner` keeps of its last call for prefix reuse."""

    cache: Any  # the DynamicCache returned by generate
    tokens: Any  # int64 array (rows, longest): the tokens each row's keys/values cover, left-aligned, -1 after
    starts: list[int]  # the cache column of each row's first token (its left padding)


@dataclass
class LLMConfig:
    """How :class:`ChatLLMQuestioner` loads and decodes (ChatCaptioner: 30 tokens per question, 100 per summary;
    here 40 per summary, asked for in at most 30 words: X2-VLM's text side keeps 30 words / 40 tokens, so a longer
    summary would be cut before the model sees it — :func:`capret_utils.captions.length.truncation_report`)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # None = bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # NF4 + double quant via BitsAndBytesConfig (GPU; CPU only for tiny models)
    compute_dtype: str = "bfloat16"  # 4-bit compute dtype
    max_new_tokens: int = 30  # per question
    summary_max_new_tokens: int = 40
    min_new_tokens: int = 0  # > 0 forces lengths (benchmarks, random test models)
    do_sample: bool = False  # greedy by default (deterministic, batch-invariant)
    temperature: float = 0.6  # only with do_sample (ChatCaptioner used 0.6)
    revision: str | None = None
    prefix_cache: bool = True  # reuse the previous call's KV cache for the shared prompt prefix (exact; see below)
    question_instruction: str = QUESTION_INSTRUCTION
    next_question_instruction: str = NEXT_QUESTION_INSTRUCTION
    summary_instruction: str = SUMMARY_INSTRUCTION


class ChatLLMQuestioner:
    """Any Hugging Face chat causal LM as the questioner (default Phi-3-mini-4k-instruct), batched.

    The instruction goes into the first user turn (Phi-3 was not trained with system prompts; old templates
    drop them); each past round is an assistant turn ``Question: …`` and a user turn ``Answer: …``; the last
    user turn ends with the next-question (or summary) instruction and the assistant turn is pre-filled with the
    cue ``Question:`` (or ``Summary:``). A tokenizer without a chat template gets ChatCaptioner's flat completion
    prompt instead. Prompts are left-padded into one ``generate`` call per round; decoding stops on every end
    token the model and tokenizer declare (Phi-3: ``<|end|>`` 32007 and ``<|endoftext|>`` 32000).

    Prefix reuse (``LLMConfig.prefix_cache``, default on): each round re-sends the whole dialogue, so the KV
    cache of the previous call is kept and every prompt of the next call starts from the longest token prefix it
    shares with any row of that call (its own dialogue up to the previous answer; the next-question instruction
    sits in the last user turn, so the shared part ends before it). The prompt text and the token ids, mask and
    position ids given to the model are unchanged; greedy outputs are the same as with a full prefill (tested).
    On the benchmark (batch 32, 10 rounds) ~80 % of the prompt tokens come from the cache. The cache of the last
    call is held until the next one (on a GPU ≈ 0.39 MB per token per row for Phi-3-mini in bf16), call
    :meth:`clear_prefix_cache` to free it. With ``prefix_cache=False`` every call is a plain ``generate``.
    """

    def __init__(self, model_id: str = DEFAULT_LLM, config: LLMConfig | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or LLMConfig()
        self.model_id = str(model_id)
        self.name = f"llm:{self.model_id}" + (" (4-bit)" if self.config.load_in_4bit else "")
        self.device = str(resolve_device(self.config.device))
        kw = {"revision": self.config.revision} if self.config.revision else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = _load_model(AutoModelForCausalLM, self.model_id, self.device, self.config.dtype,
                                 self.config.load_in_4bit, self.config.compute_dtype, self.config.revision)
        if self.config.load_in_4bit and self.device == "cpu" and self.model.num_parameters() > 50_000_000:
            warnings.warn(f"{self.model_id}: 4-bit NF4 on CPU is slower than bf16/fp32 (weights are dequantised "
                          f"for every matmul); it is meant for GPUs and tiny test models", RuntimeWarning,
                          stacklevel=2)
        self.stop_ids = self._stop_ids()
        self.stats = GenerationStats()
        self._prefix: _PrefixState | None = None

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        for tok in ("<|end|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>"):
            if tok in vocab:
                ids.add(vocab[tok])
        if not ids:
            raise ValueError(f"{self.model_id}: neither the model nor the tokenizer declares an end token")
        return sorted(ids)

    # prompts ------------------------------------------------------------------------------------------
    def _messages(self, turns: Sequence[Turn], final_instruction: str) -> list[dict[str, str]]:
        cfg = self.config
        msgs = [{"role": "user", "content": cfg.question_instruction}]
        for t in turns:
            if not t.question:
                continue
            answer = t.answer or (REPEATED_ANSWER if t.reason == "repeated question" else NO_ANSWER)
            msgs.append({"role": "assistant", "content": f"Question: {t.question}"})
            msgs.append({"role": "user", "content": f"Answer: {answer}"})
        msgs[-1]["content"] += f"\n\n{final_instruction}"
        return msgs

    def _flat_prompt(self, turns: Sequence[Turn], final_instruction: str) -> str:
        log = "\n".join(f"Question: {t.question}\nAnswer: {t.answer or NO_ANSWER}" for t in turns if t.question)
        return f"{self.config.question_instruction}\n{log}\n{final_instruction}\n"

    def prompt(self, turns: Sequence[Turn], summary: bool = False) -> str:
        """The exact text sent to the model for one dialogue (before tokenisation)."""
        final = self.config.summary_instruction if summary else self.config.next_question_instruction
        cue = "Summary:" if summary else "Question:"
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(self._messages(turns, final), tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = self._flat_prompt(turns, final)
        return text + cue

    # generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """One left-padded batched greedy (or sampled) ``generate`` call; returns the new text per prompt.

        With ``LLMConfig.prefix_cache`` the KV cache of the previous call is reused for the longest token prefix
        each prompt shares with a prompt (or prompt + generated text) of that call (:meth:`_reuse_prefix`); the
        token ids, attention mask and position ids given to the model are the same as without it.
        """
        import torch

        cfg = self.config
        bos = self.tokenizer.bos_token
        add_special = not (bos and all(p.startswith(bos) for p in prompts))
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=cfg.do_sample,
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        if cfg.min_new_tokens:
            kwargs["min_new_tokens"] = min(cfg.min_new_tokens, max_new_tokens)
        if cfg.do_sample:
            kwargs["temperature"] = cfg.temperature
        else:  # silence "generation flags are not valid" for checkpoints whose generation_config samples
            kwargs.update(temperature=None, top_p=None, top_k=None)
        cached_tokens = 0
        started = time.perf_counter()
        with torch.inference_mode():
            if cfg.prefix_cache:
                reused = self._reuse_prefix(enc["input_ids"], enc["attention_mask"], max_new_tokens)
                self._prefix = None  # the old cache is consumed (or useless): free it before generating
                if reused is not None:
                    kwargs["cache"], cached_tokens = reused
                out = self.model.generate(**enc, **kwargs, return_dict_in_generate=True)
                sequences = out.sequences
            else:
                sequences = self.model.generate(**enc, **kwargs)
        new = sequences[:, enc["input_ids"].shape[1]:]
        if str(self.model.device).startswith("cuda"):
            torch.cuda.synchronize()
        stop = set(self.stop_ids)
        self.stats.add(GenerationStats(calls=1, sequences=len(prompts),
                                       prompt_tokens=int(enc["attention_mask"].sum()),
                                       generated_tokens=sum(_generated_lengths(new, stop)),
                                       seconds=time.perf_counter() - started, cached_prompt_tokens=cached_tokens))
        if cfg.prefix_cache:
            self._remember(enc["attention_mask"], sequences, out.cache, stop)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    # prefix cache -------------------------------------------------------------------------------------
    # Every round re-sends the whole dialogue, so round r+1's prompt repeats round r's up to the last answer
    # (the next-question instruction is appended to the last user turn, so the shared part ends before it; the
    # common *token* prefix is found per row, whatever the layout). Reuse keeps the left-padded layout of the
    # full prompts: with T = the longest uncached suffix, row i's last T tokens are fed to the model and its
    # first len_i - T tokens (all inside its reusable prefix) are copied from the old cache into the last
    # columns of the first N - T, so token j of a row sits in the same column, with the same position id
    # (attention-mask cumsum; RoPE is applied before caching) and the same mask as in a full prefill. A cached
    # key/value depends only on the tokens before it, so the result is what a full prefill computes, up to
    # floating-point summation order (the same latitude as batching itself).

    def clear_prefix_cache(self) -> None:
        """Drop the KV cache kept from the last call (frees its memory; the next call prefills in full)."""
        self._prefix = None

    def _prefix_cache_usable(self, cache: Any, width: int) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        if not isinstance(cache, DynamicCache) or any(getattr(cache, "is_linear", [False])):
            return False
        return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                   and getattr(layer, "keys", None) is not None and layer.keys.shape[-2] == width
                   for layer in cache.layers)

    def _remember(self, attention_mask: Any, sequences: Any, cache: Any, stop: set[int]) -> None:
        """Keep ``cache`` and, per row, the tokens whose keys/values it holds (prompt + generated text up to
        the first end token; the last generated token was never fed back) and the column of the first one."""
        import numpy as np

        width = sequences.shape[1] - 1
        if not self._prefix_cache_usable(cache, width):
            return
        n_prompt = attention_mask.shape[1]
        starts = (n_prompt - attention_mask.sum(1)).tolist()
        rows = []
        for start, seq in zip(starts, sequences.tolist(), strict=True):
            gen = seq[n_prompt:width]
            k = next((i for i, t in enumerate(gen) if t in stop), len(gen))
            rows.append(seq[start:n_prompt + k])
        tokens = np.full((len(rows), max(map(len, rows))), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        self._prefix = _PrefixState(cache=cache, tokens=tokens, starts=starts)

    def _reuse_prefix(self, input_ids: Any, attention_mask: Any, max_new_tokens: int) -> tuple[Any, int] | None:
        """A ``DynamicCache`` holding the first ``N - T`` columns of this batch (see the comment above), built
        from the previous call's cache, and the number of prompt tokens it covers; ``None`` when nothing is
        reusable (first call, no shared prefix, or a sliding window the prompt could exceed)."""
        import numpy as np
        import torch
        from transformers import DynamicCache

        prev = self._prefix
        if prev is None:
            return None
        n = input_ids.shape[1]
        window = getattr(self.model.config, "sliding_window", None)
        if window and n + max_new_tokens >= window:
            return None
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu().numpy()
        old = prev.tokens
        src, shared = [], []
        for i, length in enumerate(lengths):
            x = ids[i, n - length:]
            m = min(length, old.shape[1])
            eq = old[:, :m] == x[:m]
            lcp = np.where(eq.all(1), m, eq.argmin(1))
            j = i if i < len(lcp) and lcp[i] == lcp.max() else int(lcp.argmax())
            src.append(j)
            shared.append(min(int(lcp[j]), length - 1))  # at least one token is fed to the model
        t = max(length - s for length, s in zip(lengths, shared, strict=True))
        p = n - t
        if p <= 0:
            return None
        device = prev.cache.layers[0].keys.device
        keep = [max(0, length - t) for length in lengths]  # row i's cached tokens, all within its shared prefix
        col = torch.arange(p, device=device)
        first = torch.tensor([p - k for k in keep], device=device)  # new column of the row's first cached token
        start = torch.tensor([prev.starts[j] for j in src], device=device)  # its old column
        width = prev.cache.layers[0].keys.shape[-2]
        cols = (start[:, None] + col[None, :] - first[:, None]).clamp(0, width - 1)  # padding columns: masked
        rows = torch.tensor(src, device=device)[:, None]
        data = [(layer.keys[rows, :, cols].transpose(1, 2).contiguous(),
                 layer.values[rows, :, cols].transpose(1, 2).contiguous()) for layer in prev.cache.layers]
        return DynamicCache(ddp_cache_data=data, config=self.model.config), sum(keep)

    def ask(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        prompts = [self.prompt(h) for h in histories]
        return [clean_question(t) for t in self.generate(prompts, self.config.max_new_tokens)]

    def summarise(self, histories: Sequence[Sequence[Turn]]) -> list[str]:
        prompts = [self.prompt(h, summary=True) for h in histories]
        return [clean_summary(t) for t in self.generate(prompts, self.config.summary_max_new_tokens)]


