"""Write N random experts (z = 1 + scale·N(0,1)) for a model folder, tied to its fingerprint: load for
benchmarks with many distinct adaptations.  python benchmarks/make_random_experts.py MODEL_DIR OUT_DIR N"""

import argparse
from pathlib import Path

from experts.expert import random_expert
from experts.svd import model_fingerprint, model_ranks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("n", type=int)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--base-model", default=None, help="base model name in the files (default: folder name)")
    a = p.parse_args()
    ranks, fp = model_ranks(a.model_dir), model_fingerprint(a.model_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    for i in range(a.n):
        name = f"r{i:02d}"
        random_expert(name, ranks, a.scale, 1000 + i, label=name, base_model=a.base_model or a.model_dir.name,
                      base_fingerprint=fp, description="random benchmark expert").save(a.out / f"{name}.safetensors")
    print(f"{a.n} random experts in {a.out}")


if __name__ == "__main__":
    main()
