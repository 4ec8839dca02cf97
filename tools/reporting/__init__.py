"""The parts of tools/report.py, one concern each; tools/report.py is the entry point and puts them together.

  parse.py      what a run folder says: metrics.jsonl (through t2v.runlog), train.log prose, config.yaml
  run.py        Run: everything the report needs from one folder, loaded once, read-only
  stats.py      numbers derived from a Run: duplicated steps, smoothing, wall time, restarts
  inventory.py  the files beside the logs: checkpoints (loaded with weights_only), preview grids, eval results
  plots.py      the PNG figures (matplotlib, Agg)
  markdown.py   summary.md, checkpoints.md/.csv, compare.md

Only inventory.py touches torch, lazily: the rest runs on a login node without it.
"""
