"""Backbones, decoders (registry ``tokred.plugins.DECODERS``), released checkpoints and the segmentation pipeline."""

from tokred.models.backbone import BACKBONES, build_backbone, load_backbone_checkpoint, load_state_dict_file
from tokred.models.checkpoints import load_segmentation_checkpoint
from tokred.models.decoders import DECODERS, Decoder, LinearDecoder, MaskTransformerDecoder, build_decoder
from tokred.models.segmenter import Segmenter, SegOutput, build_segmenter

__all__ = ["BACKBONES", "DECODERS", "Decoder", "LinearDecoder", "MaskTransformerDecoder", "SegOutput", "Segmenter",
           "build_backbone", "build_decoder", "build_segmenter", "load_backbone_checkpoint",
           "load_segmentation_checkpoint", "load_state_dict_file"]
