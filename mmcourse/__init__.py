"""mmcourse: the implementations behind the multimodal-models course notebooks."""

import logging
import os

from mmcourse.results import record, recorded
from mmcourse.utils import get_device, seed_everything

if os.environ.get("MMCOURSE_OFFLINE") == "1":
    from mmcourse import offline

    offline.install()


class _ImportNotices(logging.Filter):
    """Drops the notices torchao logs when it is imported on a CPU-only torch, and nothing else.

    ``transformers`` imports torchao (its torchao quantiser) whenever it builds or loads a
    model, and torchao 0.18 then logs one warning per CUDA-only extension it cannot load,
    one that Triton is missing, and torch 2.13 one per Enum it registers as a pytree constant.
    None of it matters on a CPU, and it would fill every chapter's stored output.
    """

    NOTICES = ("Failed to load", "Detected no triton", "register_constant() on Enum subclasses")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_ImportNotices())

__version__ = "0.1.0"
__all__ = ["get_device", "seed_everything", "record", "recorded", "__version__"]
