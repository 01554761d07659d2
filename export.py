"""Hand a trained adapter to the Hugging Face ecosystem.

    python export.py --checkpoint runs/gpt2-lora --peft gpt2-squad-lora       # a PEFT adapter directory
    python export.py --checkpoint runs/gpt2-lora --merged gpt2-squad          # a standalone GPT-2, adapter merged

--peft writes adapter_config.json + adapter_model.safetensors, which PEFT loads onto the base:
    PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("gpt2"), "gpt2-squad-lora")
--merged writes model.safetensors + config.json in the Hub's GPT-2 layout, for anyone with transformers:
    GPT2LMHeadModel.from_pretrained("gpt2-squad")
Either directory can be uploaded as it is (`hf upload USER/NAME DIR`). The tokenizer is GPT-2's own.
"""
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import argparse

from finetune.adapters import export_run_to_peft, load_adapted_model
from gpt2 import save_pretrained
from lora import merge_lora


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py --out directory or its checkpoint.pt (--merged "
                   "also takes a PEFT adapter directory or Hub repository id)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--peft", metavar="DIR", help="write the adapter in PEFT's format here")
    out.add_argument("--merged", metavar="DIR", help="write the base with the adapter merged in here")
    p.add_argument("--model", help="with --merged: the base to merge into (default: the checkpoint's own)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peft:
        print(f"wrote {export_run_to_peft(args.checkpoint, args.peft)}")
    else:
        model = load_adapted_model(args.checkpoint, args.model)
        merge_lora(model)  # in fp32: W + scaling * B @ A, rounded once
        print(f"wrote {save_pretrained(model, args.merged)}")


if __name__ == "__main__":
    main()
