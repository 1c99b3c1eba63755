"""Pruned, adversarially robust networks: one trial (study.trial) and the distributed study (study.search).

    study.trial        the trial's science: config, data, models, pruning, attacks, losses, engine, pipeline
    study.search       the search machinery: the Study (study.search.study) and its sub-packages folder,
                       optimize (space, samplers, Optuna), running (Ray, Tune trainable), recording (MLflow), front
    study.robustness   the robustness evaluation suite (`study evaluate`)
    study.cli          the one command line (argparse)
"""
__version__ = "0.1.0"
