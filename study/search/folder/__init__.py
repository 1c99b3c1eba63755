"""The study folder: runs/<study>/ on disk or in a bucket.

layout (StudyPaths, Manifest, file names), store (an object-store runs folder and the driver's local mirror),
lock and lock_s3 (one driver per study). Nothing here imports Ray, Optuna or MLflow.
"""
