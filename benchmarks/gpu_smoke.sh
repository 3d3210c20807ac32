#!/usr/bin/env bash
# For a session that has a CUDA GPU: the gpu benchmark, the CPU-sized benchmarks re-run on the GPU, and a short
# paper-profile smoke run (configs/paper.yaml: ResNet-50, 224-px crops of 256-px images, bf16 + channels_last)
# on tiny synthetic data, 2 IMP rounds of 2 epochs. Run from the repository root:  bash benchmarks/gpu_smoke.sh
# Results: benchmarks/results/{gpu,mask_overhead,data_path}.json and benchmarks/results/gpu_smoke.json;
# set OUT=<dir> to also copy them there. Needs ~5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LTH=${LTH:-.venv/bin/lth}
export TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

$PY -m benchmarks gpu --compile
$PY -m benchmarks mask_overhead data_path --quick

tmp=$(mktemp -d /tmp/lth-gpu-smoke.XXXXXX)
$PY - "$tmp" <<'PY'
import sys
from pathlib import Path
import numpy as np, yaml
from lth.data.store import write_prepared
tmp = Path(sys.argv[1])
raw = yaml.safe_load(Path("configs/paper.yaml").read_text())
raw["paths"] = {k: str(tmp / k) for k in ("data", "models", "results", "reports")}
raw["imp"] |= {"sources": ["cifar10"], "seeds": [0], "rounds": 2, "rewind_epoch": 2, "keep_epochs": 2}
raw["train"] |= {"max_epochs": 2, "device": "cuda"}
raw["tracking"] = {"uri": f"sqlite:///{tmp}/mlflow.db", "register": True, "artifact_location": None}
(tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
rng = np.random.default_rng(0)
size = raw["prepare"]["image_size"]
splits = {}
for split, n in (("train", 1024), ("val", 256), ("test", 256)):
    y = np.arange(n) % 10
    x = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    x[:, 0] = (y * 25).astype(np.uint8)[:, None, None]  # a learnable class signal
    splits[split] = (x, y.astype(np.int64))
write_prepared(tmp / "data", "cifar10", splits, [f"c{i}" for i in range(10)], {"origin": "gpu smoke"})
PY
start=$(date +%s.%N)
$LTH imp cifar10 --seed 0 --params "$tmp/params.yaml"
end=$(date +%s.%N)
$PY - "$tmp" "$start" "$end" <<'PY'
import json, sys, time
from pathlib import Path
import torch
tmp, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
rounds = sorted((tmp / "models" / "tickets" / "cifar10" / "seed0").glob("round*/ticket.json"))
out = {"benchmark": "gpu_smoke", "command": "bash benchmarks/gpu_smoke.sh", "gpu": torch.cuda.get_device_name(0),
       "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "setting": "configs/paper.yaml, ResNet-50, 1024 synthetic "
       "256-px train images, 224 crop, batch 64, bf16 + channels_last, 2 rounds x 2 epochs",
       "seconds": end - start, "tickets": [json.loads(p.read_text()).get("metrics", {}) for p in rounds]}
Path("benchmarks/results/gpu_smoke.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
assert len(rounds) == 3, f"expected tickets of rounds 0..2, found {len(rounds)}"
PY
rm -rf "$tmp"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/; fi
echo "gpu smoke: OK"
