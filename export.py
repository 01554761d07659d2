"""Hand a trained adapter to the Hugging Face ecosystem.

    python export.py --checkpoint runs/gpt2-lora --peft gpt2-squad-lora       # a PEFT adapter directory
    python export.py --checkpoint runs/gpt2-lora --merged gpt2-squad          # a standalone GPT-2, adapter merged

--peft writes adapter_config.json + adapter_model.safetensors, which PEFT loads onto the base:
    PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("gpt2"), "gpt2-squad-lora")
--merged writes model.safetensors + config.json in the Hub's GPT-2 layout, for anyone with transformers:
    GPT2LMHeadModel.from_pretrained("gpt2-squad")
A run trained on a quantized base (--quantize int8/nf4) is merged into the dequantized base, the weights its
answers in evaluate.py come from. Each writes only into a new or empty folder, or with --overwrite over a folder
of the same kind (a PEFT adapter, a model of config.json + model.safetensors): never over its inputs, a run or
anything else.
Either directory can be uploaded as it is (`hf upload USER/NAME DIR`). The tokenizer is GPT-2's own.
"""
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import argparse
from pathlib import Path

import torch

from finetune.adapters import export_run_to_peft
from finetune.model import load_answerer
from finetune.outputs import MODEL_DIR, PEFT_DIR, Output, check_outputs
from finetune.run import checkpoint_path, read_checkpoint
from gpt2 import PRESETS, save_pretrained
from gpt2.pretrained import HUB_MODELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory or its checkpoint.pt (--merged "
                   "also takes a PEFT adapter directory or Hub repository id)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--peft", metavar="DIR", help="write the adapter in PEFT's format here")
    out.add_argument("--merged", metavar="DIR", help="write the base with the adapter merged in here")
    p.add_argument("--model", help="with --merged: the base to merge into (default: the checkpoint's own)")
    p.add_argument("--strict", action="store_true", help="with --merged: refuse a base whose weights are not the "
                   "ones the adapter was trained on (default: a warning)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder this command wrote before (a PEFT "
                   "adapter for --peft, a model for --merged); nothing else is ever replaced")
    args = p.parse_args(argv)
    if args.peft and (args.model or args.strict):
        p.error("--peft writes the adapter alone, without a base: --model and --strict go with --merged")
    if args.model in PRESETS and args.model not in HUB_MODELS:
        p.error(f"{args.model} is a shape without pretrained weights; a run trained on it (train.py --init random) "
                f"rebuilds its base itself: drop --model")
    return args


def read_paths(args: argparse.Namespace) -> list[str | Path | None]:
    """Every file (or folder) export.py reads: the run (its folder and checkpoint.pt) or the PEFT adapter, and the
    base it merges into (--model, else the run's own when it is a local path). No output may replace them."""
    run_checkpoint = checkpoint_path(args.checkpoint)
    own_base = read_checkpoint(run_checkpoint).base.model if args.merged and run_checkpoint else None
    return [args.checkpoint, run_checkpoint, args.model, own_base]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Output(Path(args.peft), "--peft", PEFT_DIR) if args.peft else Output(Path(args.merged), "--merged", MODEL_DIR)
    check_outputs([out], read_paths(args), args.overwrite)
    if args.peft:
        print(f"wrote {export_run_to_peft(args.checkpoint, args.peft)}")
    else:
        # The base the run's answers come from: a run trained on a quantized base (train.py --quantize) is merged
        # into the dequantized weights, exactly as evaluate.py answers with it, in fp32.
        run = read_checkpoint(args.checkpoint) if checkpoint_path(args.checkpoint) else None
        quantize = run.base.quantize if run else "none"
        model = load_answerer(run or args.checkpoint, args.model, torch.device("cpu"), torch.float32, quantize,
                              args.strict)
        print(f"wrote {save_pretrained(model, args.merged)}")


if __name__ == "__main__":
    main()
