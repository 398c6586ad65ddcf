import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # ``slow``: CPU tests whose check a cheaper test also makes on CI's path; MMSINK_SLOW=1 or ``-m slow``
    # runs them
    run_slow = os.environ.get("MMSINK_SLOW") == "1" or "slow" in (config.getoption("markexpr") or "")
    slow = pytest.mark.skip(reason="slow: set MMSINK_SLOW=1 (or -m slow) to run it")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(slow)


# The eval, sweep and parallel tests share these (one per test module): a tiny random LLaVA with the
# reference tokenizer, and a feature cache folder. ``cache`` here replaces pytest's own fixture of that
# name, which no test uses.
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_eval import make_model

    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")
