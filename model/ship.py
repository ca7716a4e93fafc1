"""Ship a trained checkpoint: its weights as float16 (half the size, the same predictions within
float16's rounding) with a model card inside (and as ``<stem>.json`` beside it), into ``model/checkpoints/``, the folder test_net
reads by default (``TEST.MODEL_WEIGHTS_FOLDER``).

    python -m model.ship output/kidney/model_UneXt_resnet10t_all.pth --card card.json
    python -m model.ship SRC --out model/checkpoints/glomeruli_kidney.pth

``card.json`` holds what the model card says (name, version, training data and their licences,
held-out figures, intended use, limits); it is stored in the checkpoint as ``card`` next to the
pixel size and threshold the checkpoint carries already.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, Optional

from model.card import model_card, write_card
from model.checkpoint import FORMAT, SHIPPED_FOLDER, load_checkpoint
from utils.io import atomic_write_bytes

__all__ = ["SHIPPED_FOLDER", "DEFAULT_NAME", "ship_checkpoint"]

logger = logging.getLogger(__name__)

DEFAULT_NAME = "glomeruli_kidney.pth"


def ship_checkpoint(src: str, dst: str, card: Optional[Dict[str, object]] = None) -> int:
    """Write ``src`` (a toolkit checkpoint) to ``dst`` with float16 weights and ``card``; returns
    the bytes written."""
    import io

    import torch

    ckpt = load_checkpoint(src)
    ckpt["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    if card:
        ckpt["card"] = json.loads(json.dumps(card))  # plain types only (weights_only loading)
    assert ckpt["format"] == FORMAT
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    atomic_write_bytes(dst, buffer.getvalue())
    write_card(dst, model_card(ckpt, dst))  # <stem>.json beside it, as for every checkpoint
    return len(buffer.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a checkpoint written by train_net.py")
    parser.add_argument("--out", default=os.path.join(SHIPPED_FOLDER, DEFAULT_NAME))
    parser.add_argument("--card", default="", help="a JSON file of the model card's fields")
    args = parser.parse_args(argv)
    card = json.load(open(args.card)) if args.card else None
    size = ship_checkpoint(args.src, args.out, card)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%s -> %s (%.1f MB, float16)", args.src, args.out, size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
