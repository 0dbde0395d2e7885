"""The fine-tuning configuration: :class:`TrainConfig` (every field with meaning, unit and allowed values), file names
of a run folder, and the notebook's smoke settings."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from capret_utils.data import loader as D
from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.evaluation.metrics import DEFAULT_KS
from capret_utils.train import losses as L
from capret_utils.x2vlm.config import RANDOM_INIT_PRESETS as _X2VLM_RANDOM_INIT_PRESETS
from capret_utils.x2vlm.lora import HEAD_NAMES  # noqa: F401  (re-exported: train.HEAD_NAMES)

RANDOM_INIT_PRESETS = _X2VLM_RANDOM_INIT_PRESETS  # re-exported: train.RANDOM_INIT_PRESETS
STATE_DIR = "train_state"
CHECKPOINT_DIR = "checkpoint"
INFO_FILE = "finetune_info.json"
ARCFACE_FILE = "arcface.safetensors"
HISTORY_CSV, HISTORY_JSON = "history.csv", "history.json"
EVAL_KS = DEFAULT_KS  # the one k list (capret_utils.evaluation.metrics.DEFAULT_KS)
HEADLINE = ("top1", "top5", "top10", "top20", "mAP")
_CONFIG_VOLATILE = ("transformers_version", "name_or_path", "dtype", "torch_dtype", "output_attentions",
                    "output_hidden_states", "return_dict", "use_cache")
# Recipes: the fields a recipe sets. "demo" = this module's defaults, tuned on the synthetic benchmark with the
# random-init demo preset (docs/experiments.md). "x2vlm" = the official retrieval fine-tune (X-VLM's
# Retrieval_coco.yaml, which X2-VLM's authors point to; docs/x2vlm.md section 6): 384 px, full fine-tuning, AdamW
# lr 3e-5, weight decay 0.01, heads at lr x 2, linear decay after a 0.1 warm-up, 10 epochs over the items, batch 20,
# ITC + ITM 1 : 1, random resized crops of scale (0.5, 1) with the absolute 3:4..4:3 aspect range (no erasing; the
# official RandAugment is not implemented); no box loss and no category term. The identity ArcFace (margin
# 0.15 rad, scale 30) is the original study's addition, kept so the recipe answers its question. per_identity 1:
# the official sampler draws random pairs, so a batch holds 20 different items (here 20 different identities,
# the most in-batch ITC negatives), and ArcFace needs no positives in the batch.
RECIPES: dict[str, dict[str, Any]] = {
    "demo": dict(finetune_mode="auto", image_res=0, lr=2e-3, weight_decay=0.05, head_lr_mult=2.0,
                 schedule="cosine", warmup=0.1, epochs=30, batch_size=64, per_identity=1, w_itc=1.0, w_itm=1.0,
                 w_box=1.0, w_arcface=1.0, w_category=1.0, category_recolour=64, margin=0.15, arcface_scale=30.0,
                 crop_scale=(0.9, 1.0), crop_ratio_relative=True, erase_prob=0.5, photometric=0.0,
                 tta_contexts=()),
    "x2vlm": dict(finetune_mode="full", image_res=384, lr=3e-5, weight_decay=0.01, head_lr_mult=2.0,
                  schedule="linear", warmup=0.1, epochs=10, batch_size=20, per_identity=1, w_itc=1.0, w_itm=1.0,
                  w_box=0.0, w_arcface=1.0, w_category=0.0, category_recolour=0, margin=0.15, arcface_scale=30.0,
                  crop_scale=(0.5, 1.0), crop_ratio_relative=False, erase_prob=0.0, photometric=0.0,
                  tta_contexts=()),
}
# fields that may change between a killed run and its resume without changing the trajectory
_RESUME_FREE = ("resume", "num_workers", "eval_every", "ckpt_every", "keep_checkpoints", "progress", "device",
                "eval_image_level", "threads", "gradient_checkpointing", "recipe", "cache_mb", "bad_images",
                "log_every", "eval_items", "tta_contexts")


@dataclass
class TrainConfig:
    """Everything :func:`~capret_utils.train.finetune` needs. Notebook 03's parameters cell sets fields by name
    (:func:`config_from_params`); its ``overrides`` parameter reaches every other field. How the defaults were
    chosen, with the commands that reproduce each decision: ``docs/experiments.md``.

    The defaults are the ``demo`` recipe (:data:`RECIPES`). :func:`config_from_params` / :func:`apply_recipe`
    replace the fields of the chosen recipe that the caller left at their defaults; a ``TrainConfig`` built
    directly keeps its field values as given.

    Args:
        model: X2-VLM to fine-tune: a preset ("tiny", "demo": random init; "base", "large"), an official
            checkpoint file (.th / .pth), or a capret checkpoint / ``save_pretrained`` folder.
        image_res: input side in pixels; 0 = the model's default (demo 64, tiny 32, base / large 384).
        tokenizer: "" = auto (a WordPiece vocabulary built from the texts for tiny / demo, bert-base-uncased
            otherwise), "build", or a hub name / local folder with vocab.txt.
        finetune_mode: "auto" (full for the random-init presets, LoRA otherwise), "lora" or "full"; the x2vlm
            recipe sets "full", as the official fine-tune (its lr 3e-5 is a full fine-tuning rate).
        recipe: "auto" (demo for the random-init presets tiny / demo; x2vlm for base, large, official checkpoints
            and capret checkpoint folders), "demo" (the defaults here, tuned on the synthetic demo) or "x2vlm" (the
            official X2-VLM retrieval fine-tune plus the study's ArcFace); see :data:`RECIPES`.
        lora_r: LoRA rank (integer >= 1).
        lora_alpha: LoRA scaling numerator; the update is scaled by lora_alpha / lora_r.
        lora_dropout: dropout on the LoRA branch, probability in [0, 1).
        use_captions: the text paired with each item for ITC / ITM / the box head: "none" (category name),
            "template" (the study's template caption) or "dialogue" (notebook 02's caption store).
        use_boxes: True = item crops are the training view and the box head trains on the whole photo;
            False = the whole photo for every item, no box loss.
        context: crop context on each side of the item box, fraction of the box width / height (>= 0; default
            :data:`capret_utils.data.boxes.CROP_CONTEXT`).
        tta_contexts: further crop contexts (fractions, >= 0) whose embeddings are averaged with the ``context`` one
            when crops are embedded for retrieval (test-time augmentation; evaluation only, training unchanged);
            () = off (both recipes). ``(0.0,)`` adds the tight box: +0.024 select hit@1 on the demo, but zero-shot
            rises too (docs/experiments.md, "Tried and not adopted").
        batch_size: items per micro-batch (per accumulation step) = identities per batch x per_identity; an
            optimizer step sees batch_size x grad_accum items.
        per_identity: items per identity in a batch, the K of the P x K sampler (1 = every item a different
            identity; >= 2 puts positives in each batch).
        box_fraction: share of each batch (its first rows) that also trains the box head, in (0, 1].
        itm_fraction: share of each batch (its first rows) whose ITM pairs go through the fusion encoder, in
            [0, 1]; negatives are still drawn from the whole batch. 0 = auto: 0.25 for tiny / demo, else 1.
        crop_scale: (min, max) area fraction of the random resized training crop, 0 < min <= max <= 1.
        crop_ratio_relative: True = aspect jitter relative to the crop's own shape; False = absolute 3:4..4:3.
        erase_prob: probability that a training view gets one random-colour rectangle (2-25 % of its area), [0, 1].
        photometric: strength s of the training views' photometric jitter, [0, 1): brightness gain 1 +- s,
            contrast 1 +- s / 2, per-channel colour cast 1 +- s / 4; 0 = off.
        margin: additive angular margin of the identity ArcFace, radians, [0, pi/2).
        arcface_scale: logit scale of both ArcFace heads (> 0).
        w_itc: weight of the image-text contrastive loss (0 = off).
        w_itm: weight of image-text matching with hard negatives (0 = off).
        w_box: weight of the box loss, L1 + (1 - GIoU) (0 = off; only with use_boxes).
        w_arcface: weight of the identity ArcFace on the retrieval embedding (0 = off).
        w_arcface_fused: weight of the identity ArcFace on text_proj(fusion [CLS]) of the ITM positives (0 = off).
        w_category: weight of a second ArcFace over the 13 garment categories on the retrieval embedding (0 = off).
        category_margin: additive angular margin of the category ArcFace, radians, [0, pi/2).
        category_recolour: crops per batch (the first ones) the category ArcFace sees colour-scrambled (hue
            rotation, channel order, inversion); 0 = the crops as they are.
        category_views: "recoloured" = the category term on the scrambled copies only; "both" = the mean of the
            term on the crops and on their copies.
        lr: peak AdamW learning rate of the model (backbone; heads use lr x head_lr_mult), > 0.
        lr_arcface: peak learning rate of the ArcFace class weights, > 0.
        head_lr_mult: learning-rate multiplier of the projections, ITM and box heads.
        weight_decay: AdamW weight decay, not applied to 1-d parameters (biases, norm weights) or the temperature.
        warmup: linear warm-up, fraction of the optimizer steps in [0, 1).
        schedule: decay after warm-up, "cosine" or "linear".
        epochs: passes over the training items, in both recipes: one epoch = ceil(n_items / batch_size)
            micro-batches, n_items = the training items with an identity (the ones the P x K sampler draws from;
            it draws by identity, so an epoch is a count of samples, not each item exactly once). Optimizer steps
            = epochs x that // grad_accum (demo benchmark: 2014 items, 32 micro-batches of 64, 30 epochs = 960
            steps).
        max_steps: optimizer steps; > 0 overrides epochs.
        grad_accum: micro-batches accumulated per optimizer step (>= 1). The update equals one batch of
            batch_size x grad_accum for per-sample terms (ArcFace, box); ITC and ITM draw their negatives within
            each micro-batch, so their gradients differ from one bigger batch (fewer, easier negatives).
        gradient_checkpointing: recompute each BEiT / BERT layer's activations in backward instead of keeping
            them (transformers' checkpointing, non-reentrant): far less activation memory, about a third more
            compute; gradients equal within float tolerance.
        clip_grad: maximum global gradient norm; 0 = no clipping.
        seed: seed of the model initialisation, sampling, augmentation and hard negatives.
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda[:i]".
        bf16: mixed precision on CUDA: bf16 autocast where the GPU supports it, else fp16 autocast with a
            gradient scaler (:mod:`capret_utils.train.precision`); False = float32. CPU always runs float32.
        num_workers: image-loading worker processes (DataLoader) for training and evaluation; -1 = auto (all
            cores but one, at most 8), 0 = load in the main process. Batches are identical for every value.
        cache_mb: RAM budget of the decoded-view cache, MB, shared by the workers (least recently used views are
            dropped); 0 = no cache. It helps when the views fit (the synthetic benchmark), not at DeepFashion2 size.
        bad_images: an image that cannot be read: "raise" (stop with an error naming the file) or "skip" (the item
            is left out of its batch and counted; in evaluation it gets a grey placeholder view).
        log_every: optimizer steps between loss rows in the history (and the only host syncs of the loop).
        eval_items: items of the select split evaluated during training (a fixed, seeded subset of whole pairs;
            0 = all); the evaluation at the end always uses the whole split.
        threads: torch CPU threads; 0 = leave torch's default.
        deterministic: torch.use_deterministic_algorithms while training on CPU, so repeated runs at one thread
            count are bitwise identical (CUDA untouched).
        eval_every: optimizer steps between validation evaluations; 0 = only at the end.
        eval_image_level: also evaluate image-level retrieval at each evaluation.
        ckpt_every: optimizer steps between resumable checkpoints (and always at the end).
        keep_checkpoints: resumable checkpoints kept on disk (the newest ones).
        resume: continue from ``<run_dir>/train_state`` when present (False = start over).
        progress: show a tqdm progress bar.
    """

    # model
    model: str = "demo"
    image_res: int = 0
    tokenizer: str = ""
    finetune_mode: str = "auto"
    recipe: str = "auto"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # data
    use_captions: str = "dialogue"
    use_boxes: bool = True
    context: float = CROP_CONTEXT
    tta_contexts: tuple[float, ...] = ()
    batch_size: int = 64
    per_identity: int = 1
    box_fraction: float = 0.25
    itm_fraction: float = 0.0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio_relative: bool = True
    erase_prob: float = 0.5
    photometric: float = 0.0
    # losses
    margin: float = 0.15
    arcface_scale: float = 30.0
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_box: float = 1.0
    w_arcface: float = 1.0
    w_arcface_fused: float = 0.0
    w_category: float = 1.0
    category_margin: float = 0.0
    category_recolour: int = 64
    category_views: str = "recoloured"
    # optimisation
    lr: float = 2e-3
    lr_arcface: float = 1e-2
    head_lr_mult: float = 2.0
    weight_decay: float = 0.05
    warmup: float = 0.1
    schedule: str = "cosine"
    epochs: int = 30
    max_steps: int = 0
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    clip_grad: float = 1.0
    # runtime
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    num_workers: int = -1
    cache_mb: float = 512.0
    bad_images: str = "raise"
    log_every: int = 10
    eval_items: int = 5000
    threads: int = 0
    deterministic: bool = True
    eval_every: int = 0
    eval_image_level: bool = False
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """A config from a mapping of field values (e.g. ``finetune_info.json``'s ``config``, a sweep's
        parameters); unknown names raise a ``ValueError`` that lists them, lists become tuples where the field
        is a tuple. Missing fields keep their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; the fields are {sorted(names)}")
        types = {f.name: str(f.type) for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if isinstance(value, list):
                value = tuple(value)
            elif isinstance(value, str) and types[key] in ("float", "int"):
                try:  # YAML 1.1 reads "3e-5" (no dot) as a string
                    value = float(value) if types[key] == "float" else int(value)
                except ValueError:
                    raise ValueError(f"TrainConfig.{key} is a {types[key]}, got {value!r}") from None
            kwargs[key] = value
        return cls(**kwargs)

    def validate(self) -> None:
        if self.finetune_mode not in ("auto", "lora", "full"):
            raise ValueError(f"finetune_mode must be auto | lora | full, got {self.finetune_mode!r}")
        if self.recipe not in ("auto", *RECIPES):
            raise ValueError(f"recipe must be auto | {' | '.join(RECIPES)}, got {self.recipe!r}")
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
        if any(not isinstance(c, (int, float)) or c < 0 for c in self.tta_contexts):
            raise ValueError(f"tta_contexts must be crop contexts >= 0, got {self.tta_contexts!r}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if not 0 <= self.photometric < 1:
            raise ValueError(f"photometric must be in [0, 1), got {self.photometric}")
        if self.bad_images not in ("raise", "skip"):
            raise ValueError(f"bad_images must be raise | skip, got {self.bad_images!r}")
        if self.num_workers < -1 or self.log_every < 1 or self.eval_items < 0 or self.cache_mb < 0:
            raise ValueError("num_workers >= -1, log_every >= 1, eval_items >= 0 and cache_mb >= 0 are required (got "
                             f"{self.num_workers}, {self.log_every}, {self.eval_items}, {self.cache_mb})")
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
    def recipe_name(self) -> str:
        """``recipe`` with "auto" resolved by the model: demo for the random-init presets, x2vlm otherwise."""
        if self.recipe != "auto":
            return self.recipe
        return "demo" if self.model in RANDOM_INIT_PRESETS else "x2vlm"

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
                            erase_prob=self.erase_prob, photometric=self.photometric,
                            identities_per_batch=self.batch_size // self.per_identity,
                            per_identity=self.per_identity, cache_mb=self.cache_mb, bad_images=self.bad_images)

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
                   batch_size=8, per_identity=2, eval_every=0, ckpt_every=2, device="cpu", threads=1, log_every=1)


def config_fields() -> list[str]:
    """The names of every :class:`TrainConfig` field, in order."""
    return [f.name for f in fields(TrainConfig)]


def parse_overrides(overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Notebook / sweep ``overrides``: a mapping, YAML or JSON text (``"{erase_prob: 0.3, context: 0.1}"``), or
    the path of a .yaml / .yml / .json file holding one; "" or None = no overrides."""
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    import yaml

    text = str(overrides).strip()
    path = Path(text).expanduser()
    source = "overrides"
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"overrides file {path} does not exist")
        text, source = path.read_text(), str(path)
    try:
        values = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not a YAML / JSON mapping ({err})") from err
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of TrainConfig fields, got {type(values).__name__}")
    return dict(values)


@dataclass
class ResolvedConfig:
    """A config with its recipe applied (:func:`apply_recipe`): where each field's value came from."""

    config: TrainConfig
    recipe: str  # the recipe applied: "demo" | "x2vlm"
    sources: dict[str, str]  # field -> "user" (set by the caller), "recipe" or "default"

    def params(self) -> dict[str, Any]:
        """Every resolved field, the recipe applied and each field's source: what ``params.json`` records."""
        return {**asdict(self.config), "recipe_effective": self.recipe, "param_sources": dict(self.sources)}

    def describe(self) -> str:
        """Two lines for the notebook: the recipe and the values it set."""
        config = self.config
        why = f" (auto: model {config.model!r})" if config.recipe == "auto" else ""
        from_recipe = ", ".join(f"{k} {getattr(config, k)}" for k, v in self.sources.items() if v == "recipe")
        user = ", ".join(k for k, v in self.sources.items() if v == "user")
        return (f"recipe {self.recipe}{why}: {from_recipe}\nset by you: {user or 'nothing'} (a field left at its "
                f"demo default takes the recipe's value; name it in overrides to keep the demo value)")


def apply_recipe(config: TrainConfig, user_set: Any = ()) -> ResolvedConfig:
    """Fill the fields of ``config.recipe_name``'s recipe that the user did not set. A field counts as set by the
    user when it is named in ``user_set`` or differs from the :class:`TrainConfig` default (= the demo recipe's
    value): a parameter the user sets always wins, and a value equal to the demo default is only kept against
    another recipe when named in ``user_set`` (notebook 03: in ``overrides``)."""
    if config.recipe not in ("auto", *RECIPES):
        raise ValueError(f"recipe must be auto | {' | '.join(RECIPES)}, got {config.recipe!r}")
    default = TrainConfig()
    user = set(user_set) | {f for f in config_fields() if getattr(config, f) != getattr(default, f)}
    recipe = RECIPES[config.recipe_name]
    resolved = replace(config, **{k: v for k, v in recipe.items() if k not in user})
    sources = {f: "user" if f in user else "recipe" if f in recipe else "default" for f in config_fields()}
    return ResolvedConfig(resolved, config.recipe_name, sources)


def resolve_params(params: Mapping[str, Any], overrides: str | Mapping[str, Any] | None = "") -> ResolvedConfig:
    """Notebook 03's config with its recipe applied: every field named in ``params`` (the parameters cell, e.g.
    ``globals()``; other names are ignored), then ``overrides`` (:func:`parse_overrides`) for any field (a field set
    by both takes the override), then :func:`apply_recipe` (names in ``overrides`` always count as set by the
    user). Unknown override names raise ``ValueError``; the result is validated."""
    values = {name: params[name] for name in config_fields() if name in params}
    extra = parse_overrides(overrides)
    values.update(extra)
    resolved = apply_recipe(TrainConfig.from_dict(values), user_set=extra)
    resolved.config.validate()
    return resolved


def config_from_params(params: Mapping[str, Any], overrides: str | Mapping[str, Any] | None = "") -> TrainConfig:
    """The :class:`TrainConfig` of a notebook run: :func:`resolve_params` without the sources."""
    return resolve_params(params, overrides).config
