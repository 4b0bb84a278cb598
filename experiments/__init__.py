"""Experiment runner reproducing Kaur, Cohen & Lipton (2023), "On the Maximum Hessian Eigenvalue and Generalization".

``python -m fasthess_experiments list | run PRESET [--seeds ...] [--jobs N] [--set key=value ...] | report DIR``.
Modules: config (schema, names), data (loaders), models, train (one SGD/GD/SAM/ASAM loop with λ_max tracking
and checkpoints), sam, evaluation, ddp (torchrun), storage (atomic files, checkpoints, locks), records
(versions, commit), presets (findingN-quick / -cpu / -paper), sweep (seeds, parallel jobs, resume),
stats (intervals), verdicts (three-outcome tests), plots, report (CSV, report.md, verdicts.json).
"""
