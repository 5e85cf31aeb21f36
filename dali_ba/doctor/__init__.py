"""Pre-flight check of a cluster job: will dali-ba run here, on every node, with these flags?

    python -m dali_ba.doctor                                      # this machine
    srun --mpi=pmix python -m dali_ba.doctor --recipe R --train T --val V --output O
    mpirun -np 8 python -m dali_ba.doctor ...    # or horovodrun, torchrun, plain srun: as the trainer

A failed multi-node job is expensive, and most failures are environmental: a rank without a GPU, a
DALI or torch build the driver cannot load, Horovod built without MPI, a data path missing on one
node, an output folder that is not shared, too few cores for the DALI threads. Launched exactly as
training will be (it takes every training flag), every rank checks its own node and rank 0 prints one
table, a row per node (per rank where ranks differ), then each problem as one line: what is wrong,
then what to do. ``--json PATH`` also writes every rank's findings (rank 0).

Exit status: 0 when nothing found would stop a run (warnings, such as no hardware JPEG decoder, do
not), 1 when something would, 2 on bad flags. Every check's own failure is reported as a problem, so
every rank reaches the gather; a rank that never does (a hung file system) is named after
``--timeout`` seconds (under every launcher but horovodrun --gloo: doctor/peers.py).
"""

from dali_ba.doctor.cli import main

__all__ = ["main"]
