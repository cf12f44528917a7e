r"""Does MAE pay off here, and what does each choice buy? A small experiment runner on Fashion-MNIST.

  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/study            # the default study
  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/study --budget=3  # 3x the steps
  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/study --partial=0,1,2,all
  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/mask_sweep --budget=0.5 \
      --sweep=model.mask_ratio=0.25,0.5,0.75,0.9

Stages, each in its own sub-directory of --workdir; a finished one (its stage.json) is skipped,
an interrupted one resumes from its checkpoints:
  baselines        raw pixels, k-NN and linear classifier (the frozen protocol below), once
  pretrain         configs/pretrain.py:fashion_mnist_cpu (--pretrain.KEY=VALUE); its k-NN monitor
                   also fits the linear classifier: the curves over pre-training
  frozen           the frozen encoder after pre-training and at random init: k-NN (k=20, cosine,
                   T=0.07) and the linear classifier of evaluation/linear.py on --eval_train train
                   / --eval_test test images, the same images as the baselines, for each feature:
                   the cls token, the patch mean and all patch tokens (a spatial map, as pixels)
  finetune_mae     configs/finetune.py:fashion_mnist_cpu from the pre-trained encoder
  finetune_random  the same recipe and budget from a random initialisation
  partial_K        --partial: fine-tune only the last K blocks (paper Fig. 9; `all` = finetune_mae)
--jobs=2 runs the fine-tunings side by side, each in a process of its own on its own half of the
CPU cores (their wall time together: side_by_side/stage.json); on a small CPU this is faster than
one after the other, because fine-tuning gains little from a second core.
--sweep=KEY=V1,V2,... (a pre-training config key) gives each value its own directory
sweep/KEY=V/ with its own pretrain, frozen and finetune_mae; the pixel baselines are shared.
--budget scales the pre-training and fine-tuning steps. --seeds=N runs the default study N times,
in seed_S/ for S = the pre-training config's seed and the N-1 after it (model init, masks, data
order and the fine-tunings all follow it; the pixel baselines are computed once), and reports the
mean, the standard deviation and the per-seed gap between MAE and random init. Results:
results.json, results.md and plots (curves.png; sweep.png, partial.png, seeds.png when asked for)
in --workdir.
"""
import os

from absl import app, flags, logging
from etils import epath

from mae_jax import configs, process
from mae_jax.studies.mae_vs_scratch import recipes, stages, study

configs.DEFINE_config_file("pretrain", "configs/pretrain.py:fashion_mnist_cpu",
                           "Pre-training config.")
configs.DEFINE_config_file("finetune", "configs/finetune.py:fashion_mnist_cpu",
                           "Fine-tuning config (its init and trainable_blocks are set here).")
flags.DEFINE_string("workdir", None, "Where every stage and the results go.")
flags.DEFINE_float("budget", 1.0, "Multiplies the pre-training and fine-tuning steps.")
flags.DEFINE_string("sweep", "", "KEY=V1,V2,...: pre-train (and probe, fine-tune) once per value "
                    "of a pre-training config key, e.g. model.mask_ratio=0.25,0.5,0.75,0.9.")
flags.DEFINE_list("partial", [], "Partial fine-tuning: numbers of last blocks to train, or `all`.")
flags.DEFINE_integer("seeds", 1, "Run the default study with this many seeds and report their "
                     "mean, standard deviation and per-seed gap.")
flags.DEFINE_integer("jobs", 1, "Fine-tunings (the default study's, --seeds', --partial's) run "
                     "this many at a time, each in its own process on its own share of the CPU "
                     "cores. 1: one after the other, in this process.")
flags.DEFINE_integer("eval_train", 60000, "Train images of the frozen k-NN / linear protocol.")
flags.DEFINE_integer("eval_test", 10000, "Test images of the frozen k-NN / linear protocol.")
flags.DEFINE_integer("holdout", 0, "For choices of recipe: the last N train images become every "
                     "stage's eval split (fine-tuning eval, frozen protocol, baselines) and the "
                     "rest the train split, so the test split is never read. 0: off.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.seeds != 1 and (FLAGS.sweep or FLAGS.partial):
    raise app.UsageError("--seeds repeats the default study; run --sweep or --partial without it.")
  if FLAGS.jobs < 1 or (FLAGS.jobs > 1 and FLAGS.sweep):
    raise app.UsageError(f"--jobs={FLAGS.jobs}: give 1 (one fine-tuning at a time) or more; "
                         "--sweep runs its fine-tunings one at a time, so leave --jobs out.")
  process.prepare()
  workdir = epath.Path(os.path.abspath(FLAGS.workdir))
  pretrain, finetune, eval_train, eval_test = (
      FLAGS.pretrain, FLAGS.finetune, FLAGS.eval_train, FLAGS.eval_test)
  if FLAGS.holdout:
    pretrain, finetune, eval_train, eval_test = recipes.hold_out(
        pretrain, finetune, FLAGS.holdout, eval_train, eval_test)
    logging.info("Held out the last %d train images: every stage evaluates on %s.",
                 FLAGS.holdout, pretrain.data.eval_split)
  options = dict(budget=FLAGS.budget, eval_train=eval_train, eval_test=eval_test, jobs=FLAGS.jobs)
  try:
    if FLAGS.seeds != 1:
      study.run_seeds(workdir, pretrain, finetune, FLAGS.seeds, **options)
    else:
      study.run_study(workdir, pretrain, finetune, sweep=FLAGS.sweep, partial=FLAGS.partial,
                      **options)
  except stages.Interrupted as stopped:
    logging.warning("Stopped during %s (SIGTERM); run the same command again to go on.", stopped)


if __name__ == "__main__":
  app.run(main)
