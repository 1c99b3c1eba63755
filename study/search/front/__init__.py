"""The front: what is evaluated beyond the trials' own validation figures, mostly after the search.

evaluate (the Pareto front's test-split evaluation), front_files (confirm.json, robustness_final.json, test
columns), baselines (LWM at the front's sizes), robust_settings and robust_eval (study.confirm and
study.robustness: their settings and evaluations, including the suite's per-trial search metrics).
"""
