"""mmcourse: the implementations behind the multimodal-models course notebooks."""

import os

from mmcourse.results import record, recorded
from mmcourse.utils import get_device, seed_everything

if os.environ.get("MMCOURSE_OFFLINE") == "1":
    from mmcourse import offline

    offline.install()

__version__ = "0.1.0"
__all__ = ["get_device", "seed_everything", "record", "recorded", "__version__"]
