import os
import tempfile

import pytest

# Hermetic: tiny models, outputs and model folders live in a per-session temp dir, never in $HOME or the repo.
_SESSION_DIR = tempfile.mkdtemp(prefix="tunelab-tests-")
os.environ.setdefault("TUNELAB_CACHE", os.path.join(_SESSION_DIR, "cache"))
os.environ["TUNELAB_MODELS"] = os.path.join(_SESSION_DIR, "models")
os.environ["TUNELAB_OUTPUT"] = os.path.join(_SESSION_DIR, "output")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a thread pool, and pools thrash when tests start subprocesses on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _PackRootIsNoTestPackage:
    """The repository root is the pack, a package (`__init__.py`) ComfyUI imports from any folder name. pytest would
    collect it as a test package and import that `__init__.py` by the folder's name, which fails for checkouts named
    like `ComfyUI-TuneLab`; collected as a plain directory, the tests run from a folder of any name."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if str(path) == _ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # registered as a plugin, not a conftest hook: conftest hooks only see paths under tests/
    config.pluginmanager.register(_PackRootIsNoTestPackage(), "tunelab-pack-root")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMFYUI_PATH"):
        return
    skip = pytest.mark.skip(reason="needs a real ComfyUI: set COMFYUI_PATH (see README, Development)")
    for item in items:
        if "comfyui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_dir():
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_sdxl():
    from tunelab.core import models

    return models.load("tiny-sdxl", device="cpu", dtype="fp32")


@pytest.fixture
def encoders_of():
    """`encoders_of(handle)`: the diffusers text encoders behind a handle, running that handle's LoRA stack. The
    session pipes keep the adapters other tests loaded, and only encode/sample activate a stack by themselves."""
    from tunelab.core import lora
    from tunelab.core import prompt as tl_prompt

    def of(handle):
        lora.activate(handle)
        return tl_prompt._encoders_for(handle)

    return of


@pytest.fixture(scope="session")
def tiny_refiner():
    from tunelab.core import models

    return models.load("tiny-sdxl-refiner", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_ip2p():
    from tunelab.core import models

    return models.load("tiny-ip2p", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_sd15():
    from tunelab.core import models

    return models.load("tiny-sd15", device="cpu", dtype="fp32")
