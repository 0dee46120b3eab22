"""Frozen extraction (forward: the Lightning predict loop; extract: the cached FeatureSet) and the linear
classifiers fitted on it (baseline, calibrate).
"""
