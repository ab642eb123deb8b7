"""Where a sweep's jobs run besides this process (``inline``, in :mod:`datadiet_nb.sweep`): executed notebooks in a
warm papermill kernel (:mod:`.notebooks`), Ray tasks (:mod:`.ray`) and a Slurm array through submitit (:mod:`.slurm`).

Every executor runs :func:`datadiet_nb.sweep.run_remote_job` on each missing job; results land in the
store under the job's key, claims keep each job computed once, and workers send back only a short
answer (done, or why not), never a checkpoint or a tensor.
"""

EXECUTORS = ("notebooks", "inline", "ray", "slurm")
