"""Stage 1, data: DeepFashion2 on disk to items tables and model inputs.

Owns the DeepFashion2 schema, parser, official JSON formats and release checks (:mod:`.df2`), the embedded
synthetic DeepFashion2-format benchmark (:mod:`.synth`) and the per-item image views, crop boxes, augmentation
and batches that training and evaluation feed the model (:mod:`.loader`). Imports nothing from later stages.
"""
