import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def photo():
    """A real photograph (scikit-image's astronaut, 512x512 RGB) as a PIL image."""
    from PIL import Image
    from skimage import data
    return Image.fromarray(data.astronaut())
