"""SAM 2 (Ravi et al., arXiv 2408.00714) through Hugging Face transformers, as the model of automatic region masks
(`refinement.automatic_masks`): CorrCLIP (Zhang et al., ICCV 2025, arXiv 2411.10086, Sec. 3.2) restricts CLIP's
patch correlations to SAM 2's masks.

The model loads by its Hub name (`facebook/sam2-hiera-large` is the Hiera-L SAM 2 checkpoint CorrCLIP uses) or from
a local folder that transformers wrote (`save_pretrained`: config.json, the weights and the processor's config).
transformers' mask decoder falls back to its multimask outputs when the single mask is unstable
(`dynamic_multimask_via_stability`, on in its configs); Meta's `build_sam2(..., apply_postprocessing=False)`, which
CorrCLIP calls, leaves that off, and so does `load_sam2`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..choices import DEFAULT_SAM2_MODEL
from ..errors import WildsegError, first_line, setting

SAM2_EXTRA = "pip install 'wildseg[sam2]'"


@dataclass
class Sam2:
    """A loaded SAM 2: the transformers `Sam2Model` (eval mode), its `Sam2Processor`, where it came from and its
    device."""

    model: Any
    processor: Any
    name: str
    device: torch.device


def load_sam2(model: Union[str, Path] = DEFAULT_SAM2_MODEL, device: Union[str, torch.device] = "cpu",
              cache_dir: Optional[Path] = None) -> Sam2:
    """SAM 2 by its Hugging Face Hub name or from a local transformers folder.

    Args:
        model: a Hub name (`facebook/sam2-hiera-large`, `facebook/sam2.1-hiera-large`, ...) or a folder saved by
            transformers' `save_pretrained` (the model's and the processor's).
        device: where the model runs.
        cache_dir: the Hub cache (default: Hugging Face's).

    Returns:
        The loaded Sam2.

    Raises:
        WildsegError: in one line, when transformers is missing or the weights cannot be had.
    """
    try:
        from transformers import Sam2Model, Sam2Processor
        from transformers.utils import logging as transformers_logging
    except ImportError as error:
        raise WildsegError(f"SAM 2 region masks need transformers with SAM 2 (4.56 or later): {SAM2_EXTRA}") from error
    transformers_logging.disable_progress_bar()
    try:
        network = Sam2Model.from_pretrained(str(model), cache_dir=cache_dir)
        processor = Sam2Processor.from_pretrained(str(model), cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise WildsegError(f"could not load the SAM 2 model {model} ({first_line(error)}): connect to the Hugging "
                           f"Face hub once, or give {setting('sam2_model')} a folder saved by transformers "
                           "(config.json, model.safetensors, processor_config.json)") from error
    network.mask_decoder.dynamic_multimask_via_stability = False
    device = torch.device(device)
    return Sam2(network.eval().to(device), processor, str(model), device)
