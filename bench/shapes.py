"""Real model shapes for speed runs with random weights (exact for speed; no download needed)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

LLAMA_3_1_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}

# Same family, a few MB: smoke-testing a benchmark's plumbing on CPU before spending GPU time.
LLAMA_TINY: dict[str, Any] = {
    **LLAMA_3_1_8B, "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
    "bos_token_id": 1, "eos_token_id": [2],
}

SHAPES = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-tiny": LLAMA_TINY}


def model_dir(name: str, root: str | Path | None = None) -> Path:
    """A folder holding only ``config.json`` of a known shape (for ``random_weights=True``)."""
    cfg = SHAPES[name]
    d = Path(root or tempfile.mkdtemp(prefix=f"splitserve-{name}-"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def main() -> None:
    """``python -m bench.shapes llama-3.1-8b DIR``: a random-weights model folder for `splitserve serve`:
    the shape's ``config.json`` plus the embedded model's tokenizer (so the router can template and
    count tokens; its ids all fall inside the bigger vocabulary)."""
    import argparse
    import shutil

    from engine.model_store import ensure_default_model

    ap = argparse.ArgumentParser(prog="python -m bench.shapes", description=main.__doc__)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    d = model_dir(args.shape, args.folder)
    tokenizer = Path(ensure_default_model())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, d / name)
    print(d)


if __name__ == "__main__":
    main()
