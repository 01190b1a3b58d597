import os

import pytest


# Nothing in the test-suite may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny pipelines and DINOv2 encoders saved once per session: {name: folder}."""
    from crepa_diffusers import testing

    root = tmp_path_factory.mktemp("tiny_models")
    folders = {
        f"cogvideox-{v}": testing.save_tiny_cogvideox(root / f"cogvideox-{v}", v) for v in testing.COGVIDEOX_VARIANTS
    }
    folders["hunyuan"] = testing.save_tiny_hunyuan(root / "hunyuan")
    folders.update({f"wan-{v}": testing.save_tiny_wan(root / f"wan-{v}", v) for v in testing.WAN_VARIANTS})
    folders["dinov2"] = testing.save_tiny_dinov2(root / "dinov2")
    folders["dinov2-registers"] = testing.save_tiny_dinov2(root / "dinov2-registers", registers=True)
    return folders


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Three real sample clips with prompts.txt / videos.txt (a test module may override it with a richer one)."""
    from crepa_diffusers import testing

    return testing.make_video_folder(tmp_path_factory.mktemp("videos"), num_videos=3)


@pytest.fixture(scope="module")
def cog():
    """The CogVideoX training script as a module."""
    from helpers import COGVIDEOX_SCRIPT, import_script

    return import_script(COGVIDEOX_SCRIPT)
