"""How long the GCS clients retry a transient store error (429, 5xx, a dropped connection) before
the run sees it: set in one place, before the first gs:// access (docs/reliability.md, "Store
errors and retries", has each client's defaults)."""
import json
import os

# TensorFlow's gfile (config.json, metrics.jsonl, TensorBoard, orbax's step metadata) retries the
# least by default: 14 retries back off for about 3.5 min, longer than google-cloud-storage's
# 120 s deadline, so a throttled burst of a pod's writes stops no client sooner than the others.
TF_GCS_RETRIES = {"GCS_RETRY_CONFIG_MAX_RETRIES": "14"}
# tensorstore's "gcs_request_retries" context resource as JSON, e.g. {"max_retries": 32,
# "initial_delay": "1s", "max_delay": "32s"} (its defaults); for rehearsals that must fail fast.
TENSORSTORE_RETRIES_ENV = "MAE_JAX_TENSORSTORE_GCS_RETRIES"


def configure() -> None:
  """Sets the GCS clients' retries of transient errors: TensorFlow's through its environment
  variables (unless already set; read when gfile first opens a gs:// path), tensorstore's from
  $MAE_JAX_TENSORSTORE_GCS_RETRIES (its defaults otherwise) through orbax's context.

  orbax takes no retry setting for its arrays; it opens every tensorstore with its module-level
  contexts, so the resource is set in those."""
  for key, value in TF_GCS_RETRIES.items():
    os.environ.setdefault(key, value)
  spec = os.environ.get(TENSORSTORE_RETRIES_ENV)
  if spec:
    # Here, not at the top: a private module of orbax, imported only when a rehearsal asks for it.
    from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel
    retries = json.loads(spec)
    for context in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                    tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
      context["gcs_request_retries"] = retries
