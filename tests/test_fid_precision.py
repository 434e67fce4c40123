"""FID's features are computed in plain float32 whatever the process set for speed (issue 20, item 8): through
PyTorch's `fp32_precision` flags, since reading the older `allow_tf32` flags raises once anything sets those."""

import json
import subprocess
import sys

from conftest import offline_env

# In a process of its own: the precision flags are process-wide, and mixing their two APIs is what raises.
_FEATURES_AFTER_TF32_WAS_ASKED_FOR = """
import json
import torch
from ddpm_hf import fid

def flags():
    backends = torch.backends
    return {
        "cuda.matmul": backends.cuda.matmul.fp32_precision,
        "cudnn.conv": backends.cudnn.conv.fp32_precision,
        "mkldnn.matmul": backends.mkldnn.matmul.fp32_precision,
        "mkldnn.conv": backends.mkldnn.conv.fp32_precision,
    }

torch.backends.fp32_precision = "tf32"  # what a training script (or a library it imports) may set for speed
torch.backends.mkldnn.conv.fp32_precision = "bf16"
before, during = flags(), []

class Network(torch.nn.Module):  # stands in for the Inception network: records the flags it runs under
    def forward(self, x):
        during.append(flags())
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, : fid.FEATURE_DIM]

fid.load_inception = lambda device: Network()
features = fid.InceptionFeatures("cpu")(torch.full((2, 3, 8, 8), 200, dtype=torch.uint8))
print(json.dumps({"before": before, "during": during, "after": flags(), "shape": list(features.shape)}))
"""


def test_fid_runs_in_full_float32_after_the_fp32_precision_flags_were_set():
    result = subprocess.run([sys.executable, "-c", _FEATURES_AFTER_TF32_WAS_ASKED_FOR], env=offline_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [2, 2048]
    assert report["before"]["cuda.matmul"] == "tf32" and report["before"]["mkldnn.conv"] == "bf16"
    assert report["during"] == [dict.fromkeys(report["before"], "ieee")]  # every backend FID's network uses
    assert report["after"] == report["before"]  # the process's own choice, given back
