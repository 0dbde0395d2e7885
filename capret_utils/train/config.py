"""The fine-tuning configuration: :class:`TrainConfig` (every field with meaning, unit and allowed values), file names
of a run folder, and the notebook's smoke settings."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from capret_utils.data import loader as D
from capret_utils.train import losses as L

DEMO_PRESET: dict[str, Any] = dict(
    vision_width=128, vision_layers=4, vision_heads=4, vision_mlp=512, patch_size=16, image_res=64,
    text_width=128, text_heads=4, text_ffn=512, text_layers=2, fusion_layers=2, vocab_size=512,
    max_position_embeddings=64, embed_dim=128, vision_drop_path_rate=0.0, vision_stem="conv",
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
"""The ``demo`` model: small enough to learn the synthetic benchmark from random weights on 2 CPU cores in minutes
(64 px item crops, a convolutional stem onto a 4 x 4 token grid, 4 + 2 + 2 layers of width 128, no dropout, a
512-entry WordPiece vocabulary)."""
RANDOM_INIT_PRESETS = ("tiny", "demo")
HEAD_NAMES = ("vision_proj", "text_proj", "itm_head", "bbox_head")
STATE_DIR = "train_state"
CHECKPOINT_DIR = "checkpoint"
INFO_FILE = "finetune_info.json"
ARCFACE_FILE = "arcface.safetensors"
HISTORY_CSV, HISTORY_JSON = "history.csv", "history.json"
EVAL_KS = (1, 5, 10, 15, 20)
HEADLINE = ("top1", "top5", "top10", "top20", "mAP")
_CONFIG_VOLATILE = ("transformers_version", "name_or_path", "dtype", "torch_dtype", "output_attentions",
                    "output_hidden_states", "return_dict", "use_cache")
# fields that may change between a killed run and its resume without changing the trajectory
_RESUME_FREE = ("resume", "num_workers", "eval_every", "ckpt_every", "keep_checkpoints", "progress", "device",
                "eval_image_level", "threads")


@dataclass
class TrainConfig:
    """Everything ``finetune`` needs; the notebook's parameters map onto these fields one to one."""

    # model
    model: str = "demo"  # "tiny" | "demo" | "base" | "large" | official checkpoint file | our checkpoint folder
    image_res: int = 0  # input side in pixels; 0 = the model's default (demo 64, tiny 32, base/large 384)
    tokenizer: str = ""  # "" = auto (built WordPiece for tiny/demo, bert-base-uncased otherwise) | "build" | name/path
    finetune_mode: str = "auto"  # "auto" (full for random-init tiny/demo, lora otherwise) | "lora" | "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # data
    use_captions: str = "dialogue"  # text per item: "none" (category name) | "template" | "dialogue"
    use_boxes: bool = True  # item crops (+ box loss) vs whole photos (no box loss)
    # crop margin per side, fraction of the box width / height. Less context fine-tunes the demo better but lets the
    # random-weight model match more boxes by colour alone (zero-shot hit@1 0.057 / 0.071 / 0.124 at 0.1 / 0.05 / 0;
    # fine-tuned, with erasing and the category term, 960 steps, seeds 0 / 1: 0.868 / 0.862 at 0.1, 0.883 / 0.887
    # at 0.05, 2026-11-25). 0.05 keeps the zero-shot under the benchmark's 0.10 ceiling
    context: float = 0.05
    batch_size: int = 64  # items per step = identities per batch x per_identity
    # K of the P x K sampler. 1 (every item of a batch a different identity) trains the demo's retrieval embedding
    # better than 2 (val hit@1 0.776 / 0.765 vs 0.738 / 0.734 with seeds 0 / 1, 720 steps, 2026-11-25); K >= 2 puts
    # positives in each batch (soft ITC targets)
    per_identity: int = 1
    box_fraction: float = 0.25  # share of each batch that also trains the box head on the whole photo
    # share of each batch (its first rows) whose ITM pairs (1 positive + 2 hard negatives) go through the fusion
    # encoder; negatives are still drawn from the whole batch. 0 = auto: 0.25 for the random-init demo / tiny
    # presets (the CPU budget: ITM on every row cost ~0.2 s of a ~0.85 s demo step), 1 (official) otherwise
    itm_fraction: float = 0.0
    # random resized crop area range (training augmentation). (0.9, 1) beats (0.6, 1) on the demo (val hit@1
    # 0.795 / 0.803 vs 0.776 / 0.765 with seeds 0 / 1, 2026-11-25): cutting 40 % of an item removes the shape that
    # tells shorts from a skirt or a long sleeve from a short one; (1, 1) overfits the training identities
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # aspect jitter relative to the crop's own shape (True) or absolute 3:4..4:3 as in the official whole-photo
    # recipe (False: cuts elongated items, e.g. trousers, to a band)
    crop_ratio_relative: bool = True
    # random erasing: share of training views with one rectangle (2-25 % of the area) painted a random flat colour,
    # like the occluders of shopper photos. 0.5 vs 0 on the demo, 720 steps: val hit@1 0.839 / 0.839 vs 0.795 /
    # 0.803 (seeds 0 / 1, 2026-11-25)
    erase_prob: float = 0.5
    # losses
    margin: float = 0.15  # ArcFace angular margin, radians
    scale: float = 30.0  # ArcFace logit scale
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_box: float = 1.0
    w_arcface: float = 1.0
    w_arcface_fused: float = 0.0  # ArcFace on text_proj(fusion [CLS]) of the ITM positives (cross-fusion embed)
    # ArcFace over the 13 garment categories on the retrieval embedding (same margin / scale). On the demo, 960
    # steps, 1 thread (2026-11-25): context 0.05, seeds 0 / 1: val hit@1 0.883 / 0.887 vs 0.822 / 0.824 without;
    # context 0.1, seeds 0 / 1 / 2: 0.868 / 0.862 / 0.872 vs 0.847 / 0.845 / 0.826. 3 is too strong (0.769)
    w_category: float = 1.0
    # additive angular margin of the category ArcFace, radians (the identity ArcFace keeps ``margin``). On the demo,
    # 960 steps, 1 thread, seed 0 (2026-12-02): 0 / 0.15 / 0.5 gave val hit@1 0.889 / 0.876 / 0.809. With 13 classes
    # and every item labelled, a margin pulls each category into a tight cone that crowds out colour and pattern
    category_margin: float = 0.0
    # the category term trains on colour-scrambled copies (``data.recolour``: hue rotation, channel order, inversion)
    # of the first N crops of each batch (all of them when N >= batch_size); 0 = on the crops as they are.
    # Categories do not depend on colour, so this stops the term from learning a training garment's category from
    # its colour and pattern (on the plain crops the category head recognised 0.49 of the demo's validation user
    # crops, with N = 64 and "both" 0.65). Demo, 960 steps, 1 thread, seeds 0 / 1 / 2 (2026-12-03), val hit@1:
    # "recoloured" N = 64 0.901 / 0.899, "both" N = 64 0.901 / 0.893 / 0.885, N = 32 0.897 / 0.885,
    # off 0.889 / 0.891 / 0.870. Costs a second vision pass (~+30 % step time at N = 64)
    category_recolour: int = 64
    # "recoloured": the category term on the recoloured copies only; "both": the mean of the term on the crops and
    # on their copies
    category_views: str = "recoloured"
    # optimisation
    lr: float = 2e-3
    lr_arcface: float = 1e-2  # ArcFace class weights
    head_lr_mult: float = 2.0  # projections / ITM / box heads (official lr_mult 2)
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of the optimizer steps
    schedule: str = "cosine"  # "cosine" | "linear" decay after warm-up
    # passes over the train identities (one pass = identities // P batches; demo: 5 steps, so 960 steps). With random
    # erasing the demo keeps learning past 720 steps (val hit@1 0.857 vs 0.839 at 960 / 720 steps, 2026-11-25)
    epochs: int = 192
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    grad_accum: int = 1
    clip_grad: float = 1.0  # max gradient norm; 0 = off
    # runtime
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda"
    bf16: bool = True  # bf16 autocast on CUDA (CPU always runs float32)
    num_workers: int = 0  # DataLoader workers (0 = in the main process, deterministic and fine on CPU)
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    # torch.use_deterministic_algorithms while training on CPU: repeated runs at one thread count are bitwise
    # identical (without it, two 2-thread runs of the demo drifted apart in the 6th digit of the loss within 5
    # steps; another thread count changes the sums); CUDA: untouched
    deterministic: bool = True
    eval_every: int = 0  # optimizer steps between validation evaluations; 0 = only at the end
    eval_image_level: bool = False  # also evaluate image-level retrieval
    ckpt_every: int = 100  # optimizer steps between training checkpoints (and always at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from <run_dir>/train_state/latest.json when present
    progress: bool = True

    def validate(self) -> None:
        if self.finetune_mode not in ("auto", "lora", "full"):
            raise ValueError(f"finetune_mode must be auto | lora | full, got {self.finetune_mode!r}")
        if self.use_captions not in D.CAPTION_MODES:
            raise ValueError(f"use_captions must be one of {D.CAPTION_MODES}, got {self.use_captions!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be cosine | linear, got {self.schedule!r}")
        if self.batch_size % self.per_identity or self.batch_size // self.per_identity < 2:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of per_identity {self.per_identity} "
                             f"holding at least 2 identities")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 < self.box_fraction <= 1:
            raise ValueError(f"box_fraction must be in (0, 1], got {self.box_fraction}")
        if not 0 <= self.itm_fraction <= 1:
            raise ValueError(f"itm_fraction must be in [0, 1] (0 = auto), got {self.itm_fraction}")
        if not 0 <= self.category_margin < math.pi / 2:
            raise ValueError(f"category_margin is in radians and must lie in [0, pi/2), got {self.category_margin}")
        if self.category_views not in ("recoloured", "both"):
            raise ValueError(f"category_views must be recoloured | both, got {self.category_views!r}")
        if self.category_recolour < 0:
            raise ValueError(f"category_recolour counts crops of a batch (0 = off), got {self.category_recolour}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if self.lr <= 0 or self.lr_arcface <= 0:
            raise ValueError("learning rates must be > 0")
        self.weights().validate()

    def weights(self) -> L.LossWeights:
        return L.LossWeights(itc=self.w_itc, itm=self.w_itm, box=self.w_box if self.use_boxes else 0.0,
                             arcface=self.w_arcface, arcface_fused=self.w_arcface_fused if self.w_itm else 0.0,
                             category=self.w_category)

    @property
    def itm_share(self) -> float:
        """``itm_fraction`` with 0 (auto) resolved."""
        if self.itm_fraction:
            return self.itm_fraction
        return 0.25 if self.model in RANDOM_INIT_PRESETS else 1.0

    @property
    def mode(self) -> str:
        if self.finetune_mode != "auto":
            return self.finetune_mode
        return "full" if self.model in RANDOM_INIT_PRESETS else "lora"

    def data_config(self, image_res: int) -> D.DataConfig:
        return D.DataConfig(image_res=image_res, view="crop" if self.use_boxes else "image", context=self.context,
                            use_captions=self.use_captions, box_task=bool(self.use_boxes and self.w_box),
                            box_per_batch=leading_rows(self.batch_size, self.box_fraction),
                            crop_scale=tuple(self.crop_scale), crop_ratio_relative=self.crop_ratio_relative,
                            erase_prob=self.erase_prob, identities_per_batch=self.batch_size // self.per_identity,
                            per_identity=self.per_identity)

    def trajectory_digest(self, model_config: Any = None) -> str:
        """Hash of the fields that determine the training trajectory (checked on resume), and of the model's
        architecture when given (a preset changed in code changes the digest too)."""
        d = {k: v for k, v in asdict(self).items() if k not in _RESUME_FREE}
        if model_config is not None:
            d["model_config"] = {k: v for k, v in model_config.to_dict().items()
                                 if not k.startswith("_") and k not in _CONFIG_VOLATILE}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def leading_rows(batch_size: int, fraction: float) -> int:
    """How many samples of a batch (the first ones, at least 1) a partial task uses: the box task
    (``box_fraction``) and the fused ITM pairs (``itm_fraction``)."""
    return max(1, int(math.ceil(batch_size * fraction)))


def smoke_config(config: TrainConfig) -> TrainConfig:
    """Notebook 03's smoke mode: tiny preset, a few steps, CPU, no mid-run evaluation."""
    return replace(config, model="tiny", image_res=0, max_steps=min(config.max_steps or 3, 3), epochs=1,
                   batch_size=8, per_identity=2, eval_every=0, ckpt_every=2, device="cpu", threads=1)


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]

