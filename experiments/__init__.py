"""Experiment runner reproducing Kaur, Cohen & Lipton (2023), "On the Maximum Hessian Eigenvalue and Generalization".

``python -m experiments list | run PRESET [--out DIR] [--set key=value ...] | report DIR``.
Modules: data (loaders), models, train (one SGD/GD/SAM/ASAM loop with λ_max tracking and checkpoints),
presets (finding1-quick … finding5-paper), sweep (run directories, resume), report (CSV, plots, report.md).
"""
