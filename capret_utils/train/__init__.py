"""Fine-tuning X2-VLM for consumer-to-shop retrieval: one ``finetune`` call, resumable, evaluated as it goes.

What the notebook calls (``notebooks/03_finetune.ipynb``)::

    cfg = TrainConfig(model="demo", use_captions="dialogue", margin=0.15, ...)
    setup = prepare(cfg, train_items, captions=caps)           # model + tokenizer + data, seeded
    zero = evaluate(setup.bundle, val_items, cfg)               # zero-shot metrics of the same initial model
    result = finetune(setup, run_dir, val_items=val_items)      # trains, evaluates every N steps, checkpoints
    bundle = load_finetuned(run_dir / "checkpoint")             # what notebook 04 loads

Training (``finetune``): LoRA via peft (``finetune_mode="lora"``; the default for ``base`` / ``large`` / official
checkpoints) or full fine-tuning (``"full"``; the default of the randomly initialised ``demo`` / ``tiny`` presets,
which have no pre-trained features for adapters to steer); losses from :mod:`capret_utils.train.losses` with one
weight each (ITC, ITM, box, ArcFace over the identities and a second ArcFace over the 13 garment categories on
the same retrieval embedding, ``w_category``, trained on colour-scrambled copies of the crops,
``category_recolour``); AdamW with parameter groups (backbone, heads at
``lr * head_lr_mult``, ArcFace class weights at ``lr_arcface``; no weight decay on biases, norms and the
temperature); linear warm-up then cosine or linear decay; bf16 autocast on CUDA (fp16 + gradient scaler on GPUs
without bf16); gradient checkpointing; gradient accumulation; gradient
clipping; a NaN/inf guard that stops naming the step and the loss terms; the ITC temperature clamped to
[0.001, 0.5] after every step; tqdm progress.

Checkpoints (``<run_dir>/train_state/step-NNNNNN/``, written to a temporary folder and renamed, then
``latest.json`` is replaced atomically): the trainable weights (LoRA adapters + heads, or every weight), the
ArcFace class weights (identities and categories), optimizer, scheduler, RNG states (python, numpy, torch, CUDA,
the generator of the ITM negatives and the recoloured views), the P×K sampler position and the history so far.
``resume=True`` continues from the latest one; on CPU with a fixed seed a killed and resumed run ends with the same weights and metrics as an
uninterrupted one (``tests/test_train.py`` kills a real subprocess). History: ``history.csv`` /
``history.json`` in the run folder.

The final model goes to ``<run_dir>/checkpoint/``: the merged X2-VLM (``save_pretrained``, safetensors), the
tokenizer, the image-processor settings, the ArcFace class weights and ``finetune_info.json`` (config,
identity classes, crop context, metrics); :func:`load_finetuned` rebuilds the :class:`~capret_utils.evaluation.embed.ModelBundle`.

Submodules: ``config`` (TrainConfig, recipes), ``losses`` (loss functions), ``criterion`` (the per-step loss
module), ``model`` (tokenizer, model, prepare), ``loop`` (finetune, train_step, evaluate), ``checkpoint`` (train
state, final model, history), ``plan`` (the memory plan of a step), ``precision`` (bf16 / fp16 / fp32),
``distributed`` (process group, per-rank P×K shards, DDP, sharded evaluation), ``cli`` (a run from a parameter
file: the ``python -m capret_utils.train`` CLI under torchrun, and notebook 03's ``nproc``). Their
public names are re-exported here. Recipes, the memory plan, checkpointing and precision: ``docs/recipes.md``.
"""

from capret_utils.train import losses, precision  # noqa: F401
from capret_utils.train.checkpoint import (  # noqa: F401
    latest_train_state,
    load_arcface,
    load_finetuned,
    load_train_state,
    read_history,
    save_finetuned,
    save_train_state,
    write_history,
)
from capret_utils.train.config import (  # noqa: F401
    ARCFACE_FILE,
    CHECKPOINT_DIR,
    EVAL_KS,
    HEAD_NAMES,
    HEADLINE,
    HISTORY_CSV,
    HISTORY_JSON,
    INFO_FILE,
    RANDOM_INIT_PRESETS,
    RECIPES,
    STATE_DIR,
    ResolvedConfig,
    TrainConfig,
    apply_recipe,
    config_fields,
    config_from_params,
    leading_rows,
    parse_overrides,
    resolve_params,
    smoke_config,
)
from capret_utils.train.criterion import (  # noqa: F401
    Criterion,
    compute_losses,
)
from capret_utils.train.loop import (  # noqa: F401
    EpochBatches,
    FinetuneResult,
    batches_per_epoch,
    build_arcfaces,
    build_optimizer,
    build_scheduler,
    deterministic_algorithms,
    evaluate,
    finetune,
    headline,
    score_item_sets,
    seed_everything,
    suppress_known_warnings,
    total_steps_for,
    train_step,
)
from capret_utils.train.distributed import (  # noqa: F401
    DistContext,
    ShardedBatchSampler,
    init_distributed,
    teardown,
)
from capret_utils.train.cli import (  # noqa: F401
    launch,
    launch_params,
    load_result,
    read_params,
    run_params,
)
from capret_utils.train.model import (  # noqa: F401
    TrainSetup,
    build_model,
    build_tokenizer,
    caption_texts,
    model_config,
    prepare,
    tokenizer_corpus,
)
from capret_utils.train.plan import (  # noqa: F401
    MemoryPlanError,
    architecture,
    check_fits,
    measure_step,
    plan_memory,
    step_passes,
    synthetic_batch,
)
