"""Backbones (timm, behind backbone), other libraries' weight layouts (foreign), the linear head every model
ends in (heads), the saved-model folder (bundle), any saved model as one network (network), backbone cards.
"""
