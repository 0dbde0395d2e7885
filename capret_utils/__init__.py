"""capret_utils — the shared package behind capret's notebooks.

One module per stage of the flow (see README "API by module"): paths, df2, synth, captions, x2vlm,
losses, data, train, embed, retrieval, metrics, df2_eval, fo, plots, runs, sweep.
"""

__version__ = "0.1.0"
