"""A `jax.profiler` trace of chosen training steps: `config.profile_steps = (START, END)`, both
included, written to `workdir/profile` (on gs:// too: jaxlib writes there itself), where
TensorBoard's profile plugin (XProf) finds it: `tensorboard --logdir=WORKDIR/profile`.

Process 0 traces (its host's devices): on one machine several processes would write the same
host's file names into one folder. Each step's dispatch is annotated ("train", step_num) by the
trainer, so XProf's step views find the steps. The export that ends the trace pauses the run's
clock (goodput's `profile`): it is not step time."""
import logging

import jax

DIRECTORY = "profile"


def check_config(profile_steps, total_steps: int):
  """Raises ValueError for a range the trainer cannot trace; () is off."""
  if not profile_steps:
    return
  fix = ("give the first and last step to trace, e.g. --config.profile_steps=10,20, or leave it "
         "empty to trace nothing")
  if (len(profile_steps) != 2 or not all(isinstance(s, int) for s in profile_steps)
      or not 1 <= profile_steps[0] <= profile_steps[1]):
    raise ValueError(f"config.profile_steps={profile_steps!r} is not a range of steps "
                     f"START,END with 1 <= START <= END; {fix}.")
  if total_steps > 0 and profile_steps[1] > total_steps:
    raise ValueError(f"config.profile_steps={profile_steps!r} ends after the run's last step "
                     f"(total_steps={total_steps}); {fix}.")


class StepProfiler:
  """Starts the trace before the first step of the range this run executes, stops it before the
  step after the range (or when the run ends)."""

  def __init__(self, profile_steps, workdir, clock):
    self.first, self.last = profile_steps if profile_steps else (0, -1)
    self.directory = workdir / DIRECTORY
    self._clock = clock
    self._tracing = False
    self.traced = []    # the steps run while tracing
    self._enabled = jax.process_index() == 0

  def before_step(self, step: int, state):
    """Called before each step is dispatched; `state` is the last step's result."""
    if not self._enabled:
      return
    if self._tracing and step > self.last:
      self.stop(state)
    elif not self._tracing and self.first <= step <= self.last:
      jax.profiler.start_trace(str(self.directory))
      self._tracing = True
    if self._tracing:
      self.traced.append(step)

  def stop(self, state=None):
    """Ends a trace in progress (its steps' device work first, when `state` is given) and writes
    it out. A trace that cannot be written is reported, not raised: training goes on."""
    if not self._tracing:
      return
    self._tracing = False
    try:
      with self._clock.timing("profile", state):
        jax.profiler.stop_trace()
    except Exception as err:  # pylint: disable=broad-except
      logging.error("The profile of steps %d-%d could not be written to %s: %s: %s",
                    self.traced[0], self.traced[-1], self.directory, type(err).__name__, err)
      return
    logging.info("Profile of steps %d-%d written to %s; view it with tensorboard --logdir=%s "
                 "(Profile tab).", self.traced[0], self.traced[-1], self.directory,
                 self.directory)
