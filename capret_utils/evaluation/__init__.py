"""Stage 5, evaluation: embeddings, search, metrics and the variant analysis behind notebook 04.

Owns embedding items and images with a model bundle (:mod:`.embed`), FAISS search and re-ranking
(:mod:`.retrieval`), exact hit@k / mAP with intervals (:mod:`.metrics`), the official DeepFashion2 retrieval
protocol (:mod:`.df2_eval`), the variant table, breakdowns and error data (:mod:`.analysis`) and the
exact-tuple matcher, what the caption answer key alone retrieves (:mod:`.tuple_matcher`).
"""
