"""What every layer may use: errors aside, files written whole, the cache folder, process-wide runtime settings,
progress lines, the MLflow adapter (tracking; the only import of mlflow), metrics and their plots.
"""
