"""Circuit builders of the paper's architectures, and data that needs no download.

    from models import mlp, convnet, resnet18, vit, data
    net = mlp((784, 500, 10), rule="wm").build()
    net = vit(rule="wm")            # transformers: built nets (models.transformer)

Command lines: python -m models.compare (the main job), python -m models.reproduce (the authors' MNIST
experiment on full MNIST), python -m models.imagenet (full ImageNet).
"""
from . import data
from .convnet import convnet
from .mlp import mlp
from .resnet import cifar_resnet, resnet, resnet18, resnet20, resnet50
from .transformer import CharTransformer, ViT, lm_loss, transformer_lm, vit

__all__ = ["data", "mlp", "convnet", "resnet", "resnet18", "resnet50", "cifar_resnet", "resnet20", "vit",
           "transformer_lm", "ViT", "CharTransformer", "lm_loss"]
