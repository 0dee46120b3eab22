"""Pipeline files -> points (sweep), search spaces (space), a pipeline run (pipeline), its points in processes
(jobs) or on a Ray cluster (cluster), and Optuna studies (tune).
"""
