"""Fine-tuning: strategy recipes -> phases and per-group learning rates (strategies), the LightningModule and
its fit (finetune), the ratio-keeping learning-rate finder (lr_find).
"""
