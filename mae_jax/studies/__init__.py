"""Experiment drivers that run many trainings: MAE vs training from scratch on Fashion-MNIST,
and the preemption trials behind docs/reliability.md."""
