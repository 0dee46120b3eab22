"""Images on disk -> a Manifest (ingest), decoded RGB (images), augmentation (albumentations, behind augment),
and the one place a Manifest becomes datasets and loaders (loaders); sample datasets (samples).
"""
