"""The one seam with Lightning's, litdata's and jsonargparse's internals, by concern.

Every private name the template touches is used in this package and nowhere else, so an
upgrade means reading these files (and running the suite). Each entry says why no
public API serves. Checked against the pinned versions: lightning 2.6.6, litdata 0.2.76,
jsonargparse 4.x (``uv.lock``).

- ``loop``: the Trainer's fit loop (its length, batch index, logging steps, the train
  loader's sampler, the process group's timeout, the optimizers a module configures);
- ``checkpoint``: what Lightning keeps in and around a checkpoint (loop counters, RNG
  states, ModelCheckpoint's private saves);
- ``cli``: LightningCLI's subcommands;
- ``litdata``: litdata's datasets, loaders and object-store client;
- ``strategy``: ``ModelParallelStrategy``'s mesh sizes and checkpoint format (FSDP2).

The rest of the machinery calls the public functions of these modules; arithmetic on
what they return lives in the module that owns it (``resume.py``, ``plan.py``).
"""
