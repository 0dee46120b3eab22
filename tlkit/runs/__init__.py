"""Tracked stages: one MLflow run per stage (stages, evaluate) with one result type, and the leaderboard over
runs (compare).
"""
