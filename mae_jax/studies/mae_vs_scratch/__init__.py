"""Does MAE pay off here? The study of MAE against training from scratch on Fashion-MNIST; run it
with `python -m mae_jax.studies.mae_vs_scratch` (__main__.py says how).

  stages.py        a stage runs once in its directory; its record is read back afterwards
  recipes.py       the stages' configs: budget, fine-tuning plan, sweep, partial, hold-out
  frozen.py        the frozen protocol: k-NN and linear classifiers on frozen features
  study.py         the order of the stages, for one study, a sweep or several seeds
  process_pool.py  fine-tunings side by side, each in a process pinned to its own cores
  seeds.py         what holds over the seeds
  report.py        results.md and results.json; plots.py, the figures
"""
