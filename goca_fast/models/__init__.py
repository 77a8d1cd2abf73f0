"""Backbones, heads, prototypes and the two-stream GOCA network."""
from goca_fast.models.backbones import BACKBONES, build_backbone
from goca_fast.models.goca_model import GocaModel, ModelSpec, StreamOutput, run_grouped
from goca_fast.models.heads import Prototypes, load_prototypes, projection_head, prototype_separation

__all__ = ["BACKBONES", "build_backbone", "GocaModel", "ModelSpec", "StreamOutput", "run_grouped", "Prototypes",
           "load_prototypes", "projection_head", "prototype_separation"]
