"""Build ddpm_hf/assets/cifar10-1k.parquet: the first 100 training images of each CIFAR-10 class.

Run from the repo root (reads ../shared/data/cifar10/, writes only into ddpm_hf/assets/):
    python scripts/make_quickstart_subset.py [--source ../shared/data/cifar10]
The rows keep the hub dataset's schema (`img` Image, `label` ClassLabel) and original order.
"""

import argparse
import glob
import hashlib
import os

from datasets import load_dataset

PER_CLASS = 100

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--source", default=os.path.join("..", "shared", "data", "cifar10"))
parser.add_argument("--out", default=os.path.join("ddpm_hf", "assets", "cifar10-1k.parquet"))
args = parser.parse_args()

files = sorted(glob.glob(os.path.join(args.source, "train-*.parquet")))
train = load_dataset("parquet", data_files={"train": files}, split="train")
labels = train["label"]
taken, keep = {}, []
for index, label in enumerate(labels):
    if taken.get(label, 0) < PER_CLASS:
        taken[label] = taken.get(label, 0) + 1
        keep.append(index)
    if len(keep) == PER_CLASS * 10:
        break
subset = train.select(keep)
subset.to_parquet(args.out)
digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
print(f"wrote {args.out}: {len(subset)} rows, first train index {keep[0]}, last {keep[-1]}, sha256 {digest}")
