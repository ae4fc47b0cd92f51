"""Training: the loop both trainers share and its rooms, and the two trainers.

* ``loop.py``          Trainer (steps, test intervals, checkpoints, resume, exports) and run_main
* ``unet.py``          the semantic trainer (UNet / FC-DenseNet), ``maskrcnn.py`` the instance trainer
* ``config.py``        BaseTrainConfig, the common flags, --config file + flags -> config, database checks
* ``distribution.py``  devices, the multi-worker cluster, the one make_strategy
* ``slurm.py``         TF_CONFIG from SLURM's variables (stdlib only)
* ``run_folder.py``    the run folder: resume checks, trainer state, metrics.csv/curves.png, exports
* ``schedules.py``     optimizer, learning-rate schedules, early stopping
* ``preemption.py``    SIGTERM/SIGUSR1 -> checkpoint and exit 75
* ``losses.py``        segmentation losses; ``errors.py`` TrainError
"""
