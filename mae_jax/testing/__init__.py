"""Machinery of the tests and rehearsals, apart from the library: a local Cloud Storage server
that a command reaches as it would reach gs:// on a pod (local_gcs.py and the server's parts), and
a harness that preempts a local pod at chosen moments (pod_preemption.py)."""
