"""EFPN models: backbone with the extended level, FTT, RoI heads and detector builders."""

from .backbone import BACKBONES, EFPNBackbone, ExtendedLevel, resnet_efpn_backbone
from .detector import (
    EFPNFasterRCNN,
    count_flops,
    count_parameters,
    efpn_fpn,
    efpn_resnet18_fpn,
    efpn_resnet50_fpn,
    efpn_resnext101_32x8d_fpn,
    load_baseline_state_dict,
    new_module_keys,
)
from .ftt import ESPCN, FeatureTextureTransfer, NearestUpsample, SubPixelUpsample, pixel_shuffle_eq4
from .heads import EFPNRoIHeads, ohem_select, roi_level, small_roi_mask

__all__ = [
    "BACKBONES",
    "EFPNBackbone",
    "EFPNFasterRCNN",
    "EFPNRoIHeads",
    "ESPCN",
    "ExtendedLevel",
    "FeatureTextureTransfer",
    "NearestUpsample",
    "SubPixelUpsample",
    "count_flops",
    "count_parameters",
    "efpn_fpn",
    "efpn_resnet18_fpn",
    "efpn_resnet50_fpn",
    "efpn_resnext101_32x8d_fpn",
    "load_baseline_state_dict",
    "new_module_keys",
    "ohem_select",
    "pixel_shuffle_eq4",
    "resnet_efpn_backbone",
    "roi_level",
    "small_roi_mask",
]
