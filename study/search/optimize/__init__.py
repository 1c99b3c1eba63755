"""The search: what a study may search and optimize, and how Optuna proposes trials to Ray Tune.

space (search-space files, StudySettings), objectives, samplers, optuna_search (storage, study, resume checks),
searcher (StudySearch, the Tune searcher on Optuna's ask/tell), rungs and rung_scheduler (study.early_stop).
"""
