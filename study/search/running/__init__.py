"""Running a study's trials: the checks and start-up before a Study exists, Ray, the dense model, the trainable.

startup and preflight (what is checked and started first), ray_cluster (start or join Ray; GPUs per trial),
dense (the pretrained model), warmup (the driver's work done ahead in threads), trainable (one Tune trial),
progress_table (Tune's table: the searched parameters and params_kept), quiet (library lines kept out of
the log).
"""
