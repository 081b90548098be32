"""Convert the packaged SmolLM2-135M GGUF once into a plain transformers folder (loads in ~1 s, not ~17 s).

    python -m scripts.cache_smollm2                # -> cache/smollm2_135m  (paths.cache_dir, env LRLORA_CACHE)
    python -m scripts.cache_smollm2 --cache-dir /scratch/cache

The harness does the same on first use of backbone=smollm2_135m; this script only does it ahead of time.
"""

import os

from omegaconf import OmegaConf

from experiments.backbones import load_gguf
from lrlora import cli


def main(argv=None) -> None:
    ap = cli.ArgumentParser(prog="python -m scripts.cache_smollm2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=os.environ.get("LRLORA_CACHE", "cache"))
    args = ap.parse_args(argv)
    conf = os.path.join(os.path.dirname(__file__), "..", "conf", "backbone", "smollm2_135m.yaml")
    path, _ = load_gguf(OmegaConf.load(conf), args.cache_dir)
    print(f"SmolLM2-135M ready at {path}")


if __name__ == "__main__":
    cli.run(main)
