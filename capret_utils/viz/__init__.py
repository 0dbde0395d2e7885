"""Stage 6, viz: what a person looks at.

Owns the seaborn/matplotlib figures of every notebook (:mod:`.plots`), the FiftyOne dataset, saved views and
per-query results (:mod:`.fo`) and the FiftyOne App server and its browser check (:mod:`.fo_app`).
"""
